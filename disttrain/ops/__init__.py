"""Differentiable operations. Each module keeps an op's forward beside its gradient rule."""
from disttrain.ops.elementwise import (abs, add, astype, clip, compare, div, exp, gelu, leaky_relu, log,
                                       maximum, minimum, mul, neg, pow, relu, sigmoid, softplus, sqrt,
                                       sub, tanh, where)
from disttrain.ops.linalg import linear, matmul
from disttrain.ops.reduce import log_softmax, logsumexp, max, mean, min, softmax, sum, var
from disttrain.ops.shape import (broadcast_to, concat, expand_dims, getitem, pad, reshape, split,
                                 squeeze, stack, transpose)
from disttrain.ops.conv import avg_pool2d, conv2d, max_pool2d
from disttrain.ops.nn import (batch_norm, binary_cross_entropy_with_logits, cross_entropy, dropout, embedding,
                              layer_norm, mse_loss)
from disttrain.ops.recurrent import gru_sequence, lstm_sequence, rnn_sequence
