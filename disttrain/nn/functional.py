"""The functional forms of the layers (PyTorch's ``torch.nn.functional``): stateless ops that
take their parameters as arguments. Layers in ``disttrain.nn`` hold the parameters and call these."""
from disttrain.ops import (avg_pool2d, batch_norm, binary_cross_entropy_with_logits, conv2d,
                           cross_entropy, dropout, embedding, gelu, layer_norm, leaky_relu,
                           log_softmax, max_pool2d, mse_loss, relu, sigmoid, softmax, softplus, tanh)
from disttrain.ops.operands import as_tensor, same_kind
from disttrain.tensor import Tensor

__all__ = ["relu", "leaky_relu", "gelu", "sigmoid", "tanh", "softplus", "softmax", "log_softmax",
           "cross_entropy", "binary_cross_entropy_with_logits", "mse_loss", "conv2d", "max_pool2d",
           "avg_pool2d", "dropout", "embedding", "layer_norm", "batch_norm", "linear"]


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
