"""Matrix product with numpy's matmul semantics (1-D operands, batched broadcasting)."""
from disttrain.ops.broadcast import unbroadcast
from disttrain.ops.operands import binary, xp_of
from disttrain.tensor import Tensor


def matmul(a, b):
    a, b = binary("matmul", a, b)
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(f"matmul: scalar operands are not allowed (shapes {a.shape} and {b.shape}); use *")
    if a.shape[-1] != b.shape[-2 if b.ndim > 1 else 0]:
        raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not align "
                         f"({a.shape[-1]} != {b.shape[-2 if b.ndim > 1 else 0]})")
    xp = xp_of(a)
    out = xp.matmul(a.data, b.data)

    def backward(g):
        # Promote 1-D operands to matrices so one pair of formulas covers every case.
        a2 = a.data[None, :] if a.ndim == 1 else a.data
        b2 = b.data[:, None] if b.ndim == 1 else b.data
        if b.ndim == 1:  # b first: for vector @ vector, g is 0-d and must grow to (1, 1)
            g = g[..., None]
        if a.ndim == 1:
            g = g[..., None, :]
        grad_a = grad_b = None
        if a.requires_grad:
            grad_a = xp.matmul(g, xp.swapaxes(b2, -1, -2))
            grad_a = unbroadcast(grad_a, a2.shape).reshape(a.shape)
        if b.requires_grad:
            if b2.ndim == 2 and a2.ndim > 2:
                # A 2-D weight shared by a batch: sum over the batch inside one 2-D product.
                grad_b = a2.reshape(-1, a2.shape[-1]).T @ g.reshape(-1, g.shape[-1])
            else:
                grad_b = unbroadcast(xp.matmul(xp.swapaxes(a2, -1, -2), g), b2.shape)
            grad_b = grad_b.reshape(b.shape)
        return grad_a, grad_b
    return Tensor.from_op(out, (a, b), backward)
