"""Ops that move elements around without arithmetic: views, indexing, joining and padding."""
import numpy as np

from disttrain.ops.broadcast import unbroadcast
from disttrain.ops.operands import as_tensor, normalize_axis, same_kind, xp_of
from disttrain.tensor import Tensor


# --- views: reshape, transpose, broadcast, squeeze ---------------------------------------


def reshape(x, shape):
    source = x.shape
    return Tensor.from_op(x.data.reshape(shape), (x,), lambda g: (g.reshape(source),))


def transpose(x, axes=None):
    axes = tuple(reversed(range(x.ndim))) if axes is None else normalize_axis(axes, x.ndim)
    if sorted(axes) != list(range(x.ndim)):
        raise ValueError(f"transpose: axes {axes} are not a permutation of {x.ndim} dimensions")
    inverse = tuple(np.argsort(axes))
    return Tensor.from_op(x.data.transpose(axes), (x,), lambda g: (g.transpose(inverse),))


def broadcast_to(x, shape):
    xp = xp_of(x)
    source = x.shape
    return Tensor.from_op(xp.broadcast_to(x.data, shape), (x,), lambda g: (unbroadcast(g, source),))


def squeeze(x, axis=None):
    source = x.shape
    return Tensor.from_op(x.data.squeeze(axis=axis), (x,), lambda g: (g.reshape(source),))


def expand_dims(x, axis):
    xp = xp_of(x)
    source = x.shape
    return Tensor.from_op(xp.expand_dims(x.data, axis), (x,), lambda g: (g.reshape(source),))


# --- indexing ----------------------------------------------------------------------------


def _plain_index(index):
    """The index with Tensors replaced by their arrays (integer or boolean)."""
    if isinstance(index, tuple):
        return tuple(i.data if isinstance(i, Tensor) else i for i in index)
    return index.data if isinstance(index, Tensor) else index


def _is_basic(index):
    """True for numpy basic indexing (ints, slices, None, Ellipsis): no element is picked twice."""
    items = index if isinstance(index, tuple) else (index,)
    return all(item is None or item is Ellipsis or isinstance(item, slice)
               or (isinstance(item, (int, np.integer)) and not isinstance(item, bool)) for item in items)


def getitem(x, index):
    """x[index] for slices, integer arrays (repeats allowed) and boolean masks."""
    index = _plain_index(index)
    xp = xp_of(x)
    basic = _is_basic(index)

    def backward(g):
        grad = xp.zeros(x.shape, g.dtype)
        if basic:  # plain assignment: far faster than add.at, and nothing repeats (docs/performance.md)
            grad[index] = g
        else:  # add.at, not grad[index] += g: repeated indices must add up, not overwrite.
            xp.add.at(grad, index, g)
        return (grad,)
    return Tensor.from_op(x.data[index], (x,), backward)


# --- joining, splitting and padding ------------------------------------------------------


def concat(tensors, axis=0):
    tensors = [as_tensor(t) for t in tensors]
    same_kind("concat", tensors)
    xp = xp_of(tensors[0])
    axis = normalize_axis(axis, tensors[0].ndim)[0]
    bounds = np.cumsum([t.shape[axis] for t in tensors])[:-1]

    def backward(g):
        return tuple(xp.split(g, bounds, axis=axis))
    return Tensor.from_op(xp.concatenate([t.data for t in tensors], axis=axis), tuple(tensors), backward)


def stack(tensors, axis=0):
    tensors = [as_tensor(t) for t in tensors]
    same_kind("stack", tensors)
    xp = xp_of(tensors[0])
    out = xp.stack([t.data for t in tensors], axis=axis)
    axis = normalize_axis(axis, out.ndim)[0]

    def backward(g):
        return tuple(xp.moveaxis(g, axis, 0))
    return Tensor.from_op(out, tuple(tensors), backward)


def split(x, indices_or_sections, axis=0):
    """numpy.split: a list of tensors, each differentiable back into x."""
    axis = normalize_axis(axis, x.ndim)[0]
    if isinstance(indices_or_sections, int):
        if x.shape[axis] % indices_or_sections:
            raise ValueError(f"split: axis {axis} of size {x.shape[axis]} does not divide "
                             f"into {indices_or_sections} equal parts")
        step = x.shape[axis] // indices_or_sections
        bounds = list(range(step, x.shape[axis], step))
    else:
        bounds = list(indices_or_sections)
    edges = [0] + bounds + [x.shape[axis]]
    parts = []
    for start, stop in zip(edges[:-1], edges[1:]):
        index = (slice(None),) * axis + (slice(start, stop),)
        parts.append(getitem(x, index))
    return parts


def pad(x, pad_width, value=0):
    """numpy.pad in constant mode; the gradient is the un-padded window."""
    xp = xp_of(x)
    pad_width = np.broadcast_to(np.asarray(pad_width, dtype=np.int64), (x.ndim, 2))
    window = tuple(slice(before, before + size) for (before, _), size in zip(pad_width, x.shape))
    out = xp.pad(x.data, [tuple(p) for p in pad_width.tolist()], constant_values=value)
    return Tensor.from_op(out, (x,), lambda g: (g[window],))
