"""The functional forms of the layers (PyTorch's ``torch.nn.functional``): stateless ops that
take their parameters as arguments. Layers in ``disttrain.nn`` hold the parameters and call these."""
from disttrain.ops import (avg_pool2d, batch_norm, binary_cross_entropy_with_logits, conv2d,
                           cross_entropy, dropout, embedding, gelu, layer_norm, leaky_relu,
                           log_softmax, max_pool2d, mse_loss, relu, sigmoid, softmax, softplus, tanh)
from disttrain.ops.elementwise import add
from disttrain.ops.linalg import matmul
from disttrain.ops.operands import as_tensor
from disttrain.ops.shape import transpose

__all__ = ["relu", "leaky_relu", "gelu", "sigmoid", "tanh", "softplus", "softmax", "log_softmax",
           "cross_entropy", "binary_cross_entropy_with_logits", "mse_loss", "conv2d", "max_pool2d",
           "avg_pool2d", "dropout", "embedding", "layer_norm", "batch_norm", "linear"]


def linear(x, weight, bias=None):
    """x @ weight.T + bias, with weight (out_features, in_features) as in PyTorch."""
    x, weight = as_tensor(x), as_tensor(weight)
    if weight.ndim != 2 or x.ndim < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: input of shape {x.shape} and weight of shape {weight.shape} do not "
                         f"match (need input.shape[-1] == weight.shape[1])")
    out = matmul(x, transpose(weight))
    return out if bias is None else add(out, bias)
