"""Element-wise arithmetic and activations, each forward followed by its gradient rule."""
import numpy as np

from disttrain.ops import special
from disttrain.ops.broadcast import unbroadcast
from disttrain.ops.operands import as_tensor, binary, xp_of
from disttrain.tensor import Tensor

# --- arithmetic --------------------------------------------------------------------------


def add(a, b):
    a, b = binary("add", a, b)

    def backward(g):
        return unbroadcast(g, a.shape), unbroadcast(g, b.shape)
    return Tensor.from_op(a.data + b.data, (a, b), backward)


def sub(a, b):
    a, b = binary("sub", a, b)

    def backward(g):
        return unbroadcast(g, a.shape), unbroadcast(-g, b.shape)
    return Tensor.from_op(a.data - b.data, (a, b), backward)


def mul(a, b):
    a, b = binary("mul", a, b)

    def backward(g):
        return (unbroadcast(g * b.data, a.shape) if a.requires_grad else None,
                unbroadcast(g * a.data, b.shape) if b.requires_grad else None)
    return Tensor.from_op(a.data * b.data, (a, b), backward)


def div(a, b):
    a, b = binary("div", a, b)
    out = a.data / b.data

    def backward(g):
        return (unbroadcast(g / b.data, a.shape) if a.requires_grad else None,
                unbroadcast(-g * out / b.data, b.shape) if b.requires_grad else None)
    return Tensor.from_op(out, (a, b), backward)


def neg(x):
    return Tensor.from_op(-x.data, (x,), lambda g: (-g,))


def pow(x, exponent):
    """x ** exponent; the exponent may be a number or a tensor (then x must be positive)."""
    if not isinstance(exponent, Tensor):
        x = as_tensor(x)
        p = exponent
        out = x.data ** p
        return Tensor.from_op(out, (x,), lambda g: (g * p * x.data ** (p - 1),))
    x, exponent = binary("pow", x, exponent)
    out = x.data ** exponent.data

    def backward(g):
        xp = xp_of(x)
        grad_x = unbroadcast(g * exponent.data * x.data ** (exponent.data - 1), x.shape) if x.requires_grad else None
        grad_e = unbroadcast(g * out * xp.log(x.data), exponent.shape) if exponent.requires_grad else None
        return grad_x, grad_e
    return Tensor.from_op(out, (x, exponent), backward)


def exp(x):
    out = xp_of(x).exp(x.data)
    return Tensor.from_op(out, (x,), lambda g: (g * out,))


def log(x):
    return Tensor.from_op(xp_of(x).log(x.data), (x,), lambda g: (g / x.data,))


def sqrt(x):
    out = xp_of(x).sqrt(x.data)
    return Tensor.from_op(out, (x,), lambda g: (g / (2 * out),))


def abs(x):
    xp = xp_of(x)
    return Tensor.from_op(xp.abs(x.data), (x,), lambda g: (g * xp.sign(x.data),))


# --- selection ---------------------------------------------------------------------------


def _pick(a, b, a_wins):
    """a where ``a_wins`` else b; the gradient goes to whichever was picked."""
    def backward(g):
        return unbroadcast(g * a_wins, a.shape), unbroadcast(g * ~a_wins, b.shape)
    return Tensor.from_op(xp_of(a).where(a_wins, a.data, b.data), (a, b), backward)


def maximum(a, b):
    a, b = binary("maximum", a, b)
    return _pick(a, b, a.data >= b.data)  # ties send the gradient to the first argument, as numpy picks


def minimum(a, b):
    # Fused: where(a <= b, a, b) runs np.where's slow select twice (docs/performance.md).
    a, b = binary("minimum", a, b)
    return _pick(a, b, a.data <= b.data)


def where(condition, a, b):
    """a where condition holds, else b (condition is not differentiated)."""
    condition = condition.data if isinstance(condition, Tensor) else condition
    a, b = binary("where", a, b)
    xp = xp_of(a)
    condition = xp.asarray(condition, dtype=bool)

    def backward(g):
        zero = xp.zeros((), g.dtype)
        return (unbroadcast(xp.where(condition, g, zero), a.shape),
                unbroadcast(xp.where(condition, zero, g), b.shape))
    return Tensor.from_op(xp.where(condition, a.data, b.data), (a, b), backward)


def clip(x, a_min=None, a_max=None):
    # Fused: maximum then minimum is two nodes and two slow np.where selects (docs/performance.md).
    xp = xp_of(x)
    inside = xp.ones(x.shape, bool)
    if a_min is not None:
        inside &= x.data >= a_min
    if a_max is not None:
        inside &= x.data <= a_max
    return Tensor.from_op(xp.clip(x.data, a_min, a_max), (x,), lambda g: (g * inside,))


# --- casts and comparisons (comparisons are not differentiated) --------------------------


def astype(x, dtype):
    source = x.dtype
    return Tensor.from_op(x.data.astype(dtype), (x,), lambda g: (g.astype(source),))


def compare(a, b, name):
    """a < b and friends: a boolean tensor, never differentiated."""
    a, b = binary(name, a, b)
    return Tensor(getattr(xp_of(a), name)(a.data, b.data))


# --- activations -------------------------------------------------------------------------


def tanh(x):
    out = xp_of(x).tanh(x.data)
    return Tensor.from_op(out, (x,), lambda g: (g * (1 - out * out),))


def sigmoid(x):
    xp = xp_of(x)
    # exp of a non-positive number only: no overflow for large |x|.
    e = xp.exp(-xp.abs(x.data))
    out = xp.where(x.data >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)
    return Tensor.from_op(out, (x,), lambda g: (g * out * (1 - out),))


def relu(x):
    positive = x.data > 0
    return Tensor.from_op(x.data * positive, (x,), lambda g: (g * positive,))


def leaky_relu(x, negative_slope=0.01):
    # Fused: where(x > 0, x, x * slope) is three nodes and two slow np.where selects (docs/performance.md).
    xp = xp_of(x)
    slope = xp.where(x.data > 0, 1, negative_slope).astype(x.dtype)
    return Tensor.from_op(x.data * slope, (x,), lambda g: (g * slope,))


_SQRT_2_OVER_PI = np.sqrt(2 / np.pi)
_SQRT_HALF = np.sqrt(0.5)
_ONE_OVER_SQRT_2PI = 1 / np.sqrt(2 * np.pi)


def gelu(x, approximate="none"):
    """x * Phi(x), Phi the standard normal CDF, as PyTorch's gelu: exact by default (Phi from
    Cody's erfc, see ops/special.py), or its tanh approximation with ``approximate="tanh"``."""
    if approximate == "tanh":
        return _gelu_tanh(x)
    if approximate != "none":
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    xp = xp_of(x)
    # Phi(x) = erfc(-x / sqrt 2) / 2: no cancellation in 1 + erf(x) for x << 0.
    cdf = 0.5 * special.erfc(x.data * -x.dtype.type(_SQRT_HALF))
    out = x.data * cdf

    def backward(g):
        density = xp.exp(-0.5 * x.data * x.data) * x.dtype.type(_ONE_OVER_SQRT_2PI)
        return (g * (cdf + x.data * density),)
    return Tensor.from_op(out, (x,), backward)


def _gelu_tanh(x):
    """GELU's tanh approximation (as GPT-2 and BERT code use it)."""
    xp = xp_of(x)
    c = x.dtype.type(_SQRT_2_OVER_PI)
    inner = c * (x.data + 0.044715 * x.data ** 3)
    t = xp.tanh(inner)
    out = 0.5 * x.data * (1 + t)

    def backward(g):
        d_inner = c * (1 + 3 * 0.044715 * x.data ** 2)
        return (g * (0.5 * (1 + t) + 0.5 * x.data * (1 - t * t) * d_inner),)
    return Tensor.from_op(out, (x,), backward)


def softplus(x):
    # Fused: composed is slower, less exact (no log1p op) and has slope 0, not 1/2, at 0 (docs/performance.md).
    xp = xp_of(x)
    e = xp.exp(-xp.abs(x.data))
    # log(1 + e^x) = max(x, 0) + log1p(e^-|x|): never overflows.
    out = xp.maximum(x.data, 0) + xp.log1p(e)

    def backward(g):
        # sigmoid(x) = (1 if x >= 0 else e^-|x|) / (1 + e^-|x|); maximum(e, x >= 0) picks the
        # numerator exactly (0 < e <= 1) without np.where's slow data-dependent select.
        return (g * (xp.maximum(e, x.data >= 0) / (1 + e)),)
    return Tensor.from_op(out, (x,), backward)
