"""``clip_grad_norm_``: rescale gradients in place so their joint norm is at most ``max_norm``."""
import math

from disttrain import backend
from disttrain.tensor import RowSparseGrad


def _grad_values(grad):
    """The array that holds a gradient's numbers (a sparse gradient's rows are unique, so its
    norm is the norm of its values)."""
    return grad.values if isinstance(grad, RowSparseGrad) else grad


def _norm(values, norm_type):
    xp = backend.array_module(values)
    if values.size == 0:
        return 0.0
    if norm_type == 2.0:  # the common case: one BLAS dot product
        return float(xp.linalg.norm(values.reshape(-1)))
    magnitudes = xp.abs(values)
    if norm_type == math.inf:
        return float(magnitudes.max())
    return float((magnitudes ** norm_type).sum()) ** (1.0 / norm_type)


def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False):
    """Scale every gradient by ``min(1, max_norm / (total_norm + 1e-6))``, as torch does.

    ``parameters`` is a Tensor or an iterable of them; those without a gradient are skipped.
    The total norm is the norm of all gradients joined into one vector; it is returned (as a
    float, measured before clipping) so callers can log it.
    """
    if hasattr(parameters, "grad"):
        parameters = [parameters]
    norm_type = float(norm_type)
    if not norm_type > 0:
        raise ValueError(f"clip_grad_norm_: norm_type must be positive or inf, got {norm_type}")
    grads = [_grad_values(p.grad) for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    norms = [_norm(grad, norm_type) for grad in grads]
    if norm_type == math.inf:
        total = max(norms)
    else:
        total = sum(norm ** norm_type for norm in norms) ** (1.0 / norm_type)
    if error_if_nonfinite and not math.isfinite(total):
        raise RuntimeError(f"clip_grad_norm_: the total norm of order {norm_type} of the gradients is "
                           f"{total}; pass error_if_nonfinite=False to clip anyway")
    scale = max_norm / (total + 1e-6)
    if scale < 1.0:  # torch multiplies by min(scale, 1); a factor of 1 changes nothing
        for grad in grads:
            grad *= grad.dtype.type(scale)  # in place, keeping float32 gradients float32
    return total
