"""Differentiable operations. Each module keeps an op's forward beside its gradient rule."""
from disttrain.ops.elementwise import (abs, add, astype, clip, compare, div, exp, gelu, leaky_relu, log,
                                       maximum, minimum, mul, neg, pow, relu, sigmoid, softplus, sqrt,
                                       sub, tanh, where)
from disttrain.ops.linalg import matmul
from disttrain.ops.reduce import log_softmax, logsumexp, max, mean, min, softmax, sum, var
from disttrain.ops.shape import (broadcast_to, concat, expand_dims, getitem, pad, reshape, split,
                                 squeeze, stack, transpose)
