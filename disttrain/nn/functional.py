"""The functional forms of the layers (PyTorch's ``torch.nn.functional``): stateless ops that
take their parameters as arguments. They live in ``disttrain.ops``, beside their gradient rules;
this module names them as PyTorch does. Layers in ``disttrain.nn`` hold the parameters and call these."""
from disttrain.ops import (avg_pool2d, batch_norm, binary_cross_entropy_with_logits, conv2d,
                           cross_entropy, dropout, embedding, gelu, layer_norm, leaky_relu, linear,
                           log_softmax, max_pool2d, mse_loss, relu, sigmoid, softmax, softplus, tanh)

__all__ = ["relu", "leaky_relu", "gelu", "sigmoid", "tanh", "softplus", "softmax", "log_softmax",
           "cross_entropy", "binary_cross_entropy_with_logits", "mse_loss", "conv2d", "max_pool2d",
           "avg_pool2d", "dropout", "embedding", "layer_norm", "batch_norm", "linear"]
