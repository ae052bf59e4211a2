"""Reductions over axes (numpy's axis/keepdims) and the softmax family built on them."""
from disttrain import backend
from disttrain.ops.operands import normalize_axis, xp_of
from disttrain.tensor import Tensor


# --- reductions --------------------------------------------------------------------------


def _expand(g, shape, axes, keepdims):
    """Reshape a reduced gradient so it broadcasts against the input again."""
    if not keepdims:
        g = g.reshape([1 if axis in axes else size for axis, size in enumerate(shape)])
    return g


def sum(x, axis=None, keepdims=False):
    axes = normalize_axis(axis, x.ndim)
    xp = xp_of(x)

    def backward(g):
        return (xp.broadcast_to(_expand(g, x.shape, axes, keepdims), x.shape),)
    return Tensor.from_op(x.data.sum(axis=axes, keepdims=keepdims), (x,), backward)


def mean(x, axis=None, keepdims=False):
    axes = normalize_axis(axis, x.ndim)
    count = 1
    for axis_ in axes:
        count *= x.shape[axis_]
    xp = xp_of(x)

    def backward(g):
        return (xp.broadcast_to(_expand(g, x.shape, axes, keepdims) / count, x.shape),)
    return Tensor.from_op(x.data.mean(axis=axes, keepdims=keepdims), (x,), backward)


def _extremum(x, axis, keepdims, pick):
    axes = normalize_axis(axis, x.ndim)
    out = pick(x.data, axis=axes, keepdims=True)

    def backward(g):
        # Ties share the gradient equally, so the rule is the average of the subgradients.
        hits = x.data == out
        count = hits.sum(axis=axes, keepdims=True)
        return (_expand(g, x.shape, axes, keepdims) * hits / count,)
    return Tensor.from_op(out if keepdims else out.squeeze(axis=axes), (x,), backward)


def max(x, axis=None, keepdims=False):
    return _extremum(x, axis, keepdims, xp_of(x).max)


def min(x, axis=None, keepdims=False):
    return _extremum(x, axis, keepdims, xp_of(x).min)


def var(x, axis=None, keepdims=False, ddof=0):
    axes = normalize_axis(axis, x.ndim)
    count = 1
    for axis_ in axes:
        count *= x.shape[axis_]
    centred = x.data - x.data.mean(axis=axes, keepdims=True)

    def backward(g):
        return (_expand(g, x.shape, axes, keepdims) * (2 / (count - ddof)) * centred,)
    out = (centred * centred).sum(axis=axes, keepdims=keepdims) / (count - ddof)
    return Tensor.from_op(out, (x,), backward)


# --- the softmax family ------------------------------------------------------------------


def logsumexp(x, axis=None, keepdims=False):
    axes = normalize_axis(axis, x.ndim)
    xp = xp_of(x)
    peak = x.data.max(axis=axes, keepdims=True)
    # Subtract the max first: exp never overflows, and the largest term is exactly 1.
    out = xp.log(xp.exp(x.data - peak).sum(axis=axes, keepdims=True)) + peak

    def backward(g):
        return (_expand(g, x.shape, axes, keepdims) * xp.exp(x.data - out),)
    return Tensor.from_op(out if keepdims else out.squeeze(axis=axes), (x,), backward)


def softmax(x, axis=-1):
    xp = xp_of(x)
    e = xp.exp(x.data - x.data.max(axis=axis, keepdims=True))
    out = e / e.sum(axis=axis, keepdims=True)

    def backward(g):
        return (out * (g - (g * out).sum(axis=axis, keepdims=True)),)
    return Tensor.from_op(out, (x,), backward)


def log_softmax_array(data, axis=-1):
    """log(softmax(data)) of an array: shifted by the max, so exp never overflows. The one
    formula that log_softmax and cross_entropy's forward share."""
    xp = backend.array_module(data)
    shifted = data - data.max(axis=axis, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))


def log_softmax(x, axis=-1):
    xp = xp_of(x)
    out = log_softmax_array(x.data, axis)

    def backward(g):
        return (g - xp.exp(out) * g.sum(axis=axis, keepdims=True),)
    return Tensor.from_op(out, (x,), backward)
