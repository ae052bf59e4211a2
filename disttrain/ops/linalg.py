"""Matrix products: matmul with numpy's semantics (1-D operands, batched broadcasting), and the
fully connected layer's x @ weight.T + bias as one op."""
from disttrain.ops.broadcast import unbroadcast
from disttrain.ops.operands import as_tensor, binary, same_kind, xp_of
from disttrain.tensor import Tensor

# --- matmul ---------------------------------------------------------------------------------


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


# --- linear (fully connected) ----------------------------------------------------------------


def linear(x, weight, bias=None):
    """x @ weight.T + bias, with weight (out_features, in_features) as in PyTorch.

    One op with its own gradient rather than transpose, matmul and add: the bias is added in
    place and the weight gradient comes out as g.T @ x, already (out, in).
    """
    x, weight = as_tensor(x), as_tensor(weight)
    bias = None if bias is None else as_tensor(bias)
    same_kind("linear", [x, weight] + ([bias] if bias is not None else []))
    if weight.ndim != 2 or x.ndim < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: input of shape {x.shape} and weight of shape {weight.shape} do not "
                         f"match (need input.shape[-1] == weight.shape[1])")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"linear: bias of shape {bias.shape} for weight of shape {weight.shape}")
    rows = x.data.reshape(-1, weight.shape[1])
    out = rows @ weight.data.T
    if bias is not None:
        out += bias.data

    def backward(g):
        g_rows = g.reshape(-1, weight.shape[0])
        grad_x = (g_rows @ weight.data).reshape(x.shape) if x.requires_grad else None
        grad_weight = g_rows.T @ rows if weight.requires_grad else None
        if bias is None:
            return grad_x, grad_weight
        return grad_x, grad_weight, (g_rows.sum(axis=0) if bias.requires_grad else None)
    parents = (x, weight) + ((bias,) if bias is not None else ())
    return Tensor.from_op(out.reshape(x.shape[:-1] + weight.shape[:1]), parents, backward)
