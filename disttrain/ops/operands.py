"""Turn op arguments into Tensors, refusing mixes of dtype or device that would go wrong silently."""
import numpy as np

from disttrain import backend
from disttrain.tensor import Tensor


def as_tensor(value, like=None):
    """A Tensor for ``value``; Python and numpy numbers take ``like``'s floating dtype."""
    if isinstance(value, Tensor):
        return value
    if like is not None and like.dtype.kind == "f":
        array = backend.array_module(like.data).asarray(value)
        if array.dtype.kind in "biuf":
            return Tensor(array.astype(like.dtype, copy=False))
    return Tensor(value)


def binary(name, a, b):
    """(a, b) as Tensors of one dtype on one device, or a TypeError naming what does not mix."""
    if not isinstance(a, Tensor):
        a = as_tensor(a, like=b)
    if not isinstance(b, Tensor):
        b = as_tensor(b, like=a)
    if a.device != b.device:
        raise TypeError(f"{name}: tensors on devices {a.device} and {b.device} cannot mix; "
                        f"move one with .to()")
    if a.dtype != b.dtype:
        a_float, b_float = a.dtype.kind == "f", b.dtype.kind == "f"
        if a_float and b_float:
            raise TypeError(f"{name}: dtypes {a.dtype} and {b.dtype} do not mix; "
                            f"cast one with .astype()")
        if a_float:
            b = Tensor(b.data.astype(a.dtype))
        elif b_float:
            a = Tensor(a.data.astype(b.dtype))
    return a, b


def same_kind(name, tensors):
    """Check that a list of tensors (concat, stack, where) shares dtype and device."""
    first = tensors[0]
    for t in tensors[1:]:
        if t.device != first.device:
            raise TypeError(f"{name}: tensors on devices {first.device} and {t.device} cannot mix")
        if t.dtype != first.dtype:
            raise TypeError(f"{name}: dtypes {first.dtype} and {t.dtype} do not mix; cast with .astype()")


def xp_of(t):
    return backend.array_module(t.data)


def normalize_axis(axis, ndim):
    """axis (None, int or tuple, possibly negative) as a tuple of non-negative ints."""
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise np.exceptions.AxisError(f"axis {a} is out of bounds for a tensor of {ndim} dimensions")
        out.append(int(a) % ndim)
    return tuple(out)
