"""disttrain: distributed data-parallel training on numpy, with its own autodiff engine."""
from disttrain.tensor import (RowSparseGrad, Tensor, arange, is_grad_enabled, no_grad, ones, ones_like,
                              randn, tensor, zeros, zeros_like)
from disttrain.ops import (abs, clip, concat, exp, log, log_softmax, logsumexp, matmul, maximum, mean,
                           minimum, pad, relu, reshape, sigmoid, softmax, split, sqrt, stack, sum,
                           tanh, transpose, where)
from disttrain.random import manual_seed
from disttrain.checkpoint import load, save
from disttrain import backend, data, nn, optim  # noqa: E402  (subpackages use the names above)

__version__ = "0.1.0"
