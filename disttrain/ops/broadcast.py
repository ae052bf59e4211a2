"""Undo broadcasting: the single helper every binary op's gradient rule uses."""


def unbroadcast(grad, shape):
    """Sum ``grad`` over the axes that broadcasting expanded, so it gets ``shape`` back."""
    if grad.shape == tuple(shape):
        return grad
    extra = grad.ndim - len(shape)
    if extra:
        grad = grad.sum(axis=tuple(range(extra)))
    stretched = tuple(axis for axis, size in enumerate(shape) if size == 1 and grad.shape[axis] != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)
    return grad
