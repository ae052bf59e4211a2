"""Layers and the Module system (PyTorch-flavoured): parameters are registered by attribute and
named by dotted paths, which are also the parameter-server keys."""
from disttrain.nn import functional, init, utils
from disttrain.nn.activation import GELU, LeakyReLU, LogSoftmax, ReLU, Sigmoid, Softmax, Softplus, Tanh
from disttrain.nn.attention import MultiheadAttention, TransformerEncoderLayer
from disttrain.nn.conv import AvgPool2d, Conv2d, MaxPool2d
from disttrain.nn.dropout import Dropout
from disttrain.nn.embedding import Embedding
from disttrain.nn.linear import Flatten, Identity, Linear
from disttrain.nn.module import Module, ModuleList, Sequential
from disttrain.nn.norm import BatchNorm1d, BatchNorm2d, LayerNorm
from disttrain.nn.parameter import Parameter
from disttrain.nn.recurrent import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNBase, RNNCell, RNNCellBase

__all__ = ["functional", "init", "utils", "Module", "Sequential", "ModuleList", "Parameter",
           "Linear", "Flatten", "Identity", "Conv2d", "MaxPool2d", "AvgPool2d", "Dropout",
           "BatchNorm1d", "BatchNorm2d", "LayerNorm", "Embedding", "ReLU", "LeakyReLU", "GELU",
           "Sigmoid", "Tanh", "Softplus", "Softmax", "LogSoftmax", "RNNBase", "RNN", "LSTM", "GRU",
           "RNNCellBase", "RNNCell", "LSTMCell", "GRUCell", "MultiheadAttention",
           "TransformerEncoderLayer"]
