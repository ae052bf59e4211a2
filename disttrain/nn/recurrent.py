"""Recurrent layers: RNN, LSTM and GRU cells and multi-layer (bidirectional) sequence layers.

Each layer-direction is one fused op of ``disttrain.ops.recurrent`` (the time loop and its
hand-written back-propagation through time); this module makes the input projection of every
time step as one big matmul before it, and stacks layers and directions.
A cell (``LSTMCell`` ...) is the same op run for one time step.

Parameter names, shapes, gate order and initialisation are PyTorch's: ``weight_ih_l{k}``
(gates x input), ``weight_hh_l{k}`` (gates x hidden), ``bias_ih_l{k}``, ``bias_hh_l{k}``,
``..._reverse`` for the backward direction; gates (i, f, g, o) for LSTM, (r, z, n) for GRU;
every weight and bias ~ U(-1/sqrt(hidden_size), 1/sqrt(hidden_size)).
"""
import math

import numpy as np

from disttrain import ops
from disttrain.nn import functional as F, init
from disttrain.nn.module import Module
from disttrain.nn.parameter import Parameter
from disttrain.ops.operands import xp_of
from disttrain.ops.recurrent import gru_sequence, lstm_sequence, rnn_sequence
from disttrain.tensor import Tensor

# --- layers ------------------------------------------------------------------------------

_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def _input_projection(x, weight_ih, bias):
    """x (T, B, I) @ weight_ih.T + bias for every step at once: one (T*B, I) x (I, G) matmul."""
    steps, batch, features = x.shape
    gates = ops.matmul(x.reshape(steps * batch, features), weight_ih.T)
    if bias is not None:
        gates = gates + bias
    return gates.reshape(steps, batch, weight_ih.shape[0])


def _run_direction(mode, gates_x, h0, c0, weight_hh, bias_hh, reverse):
    """One layer-direction: (hidden states (T, B, H), final h (B, H), final c (B, H) or None)."""
    steps = gates_x.shape[0]
    last = 0 if reverse else steps - 1
    if mode == "LSTM":
        out = lstm_sequence(gates_x, h0, c0, weight_hh, reverse=reverse)
        return out[:steps], out[last], out[steps]
    if mode == "GRU":
        out = gru_sequence(gates_x, h0, weight_hh, bias_hh, reverse=reverse)
    else:
        nonlinearity = "tanh" if mode == "RNN_TANH" else "relu"
        out = rnn_sequence(gates_x, h0, weight_hh, nonlinearity, reverse=reverse)
    return out, out[last], None


def _folded_bias(mode, bias_ih, bias_hh):
    """The bias added to the input projection: both biases, except for GRU (see gru_sequence)."""
    if bias_ih is None:
        return None
    return bias_ih if mode == "GRU" else bias_ih + bias_hh


class _Recurrent(Module):
    """What the sequence layers and the cells share: PyTorch's initialisation."""

    def reset_parameters(self):
        """Every weight and bias ~ U(-1/sqrt(hidden_size), 1/sqrt(hidden_size))."""
        bound = 1 / math.sqrt(self.hidden_size)
        for parameter in self.parameters():
            init.uniform_(parameter, -bound, bound)


def _elman_mode(owner, nonlinearity):
    """The mode of an Elman RNN with ``nonlinearity``, or a ValueError naming the choices."""
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"{owner}: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
    return "RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU"


class RNNBase(_Recurrent):
    """Shared by RNN, LSTM and GRU: the parameters of every layer and direction, and forward()."""

    def __init__(self, mode, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False):
        super().__init__()
        if mode not in _GATES:
            raise ValueError(f"unknown recurrent mode {mode!r}; expected one of {sorted(_GATES)}")
        if not (isinstance(hidden_size, int) and hidden_size > 0):
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        if not (isinstance(num_layers, int) and num_layers > 0):
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        if not 0 <= dropout <= 1:
            raise ValueError(f"dropout must be a probability in [0, 1], got {dropout}")
        self.mode, self.input_size, self.hidden_size = mode, input_size, hidden_size
        self.num_layers, self.bias, self.batch_first = num_layers, bias, batch_first
        self.dropout, self.bidirectional = float(dropout), bidirectional
        directions = 2 if bidirectional else 1
        gate_size = _GATES[mode] * hidden_size
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else hidden_size * directions
            for direction in range(directions):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                setattr(self, "weight_ih" + suffix, Parameter(_empty(gate_size, layer_input)))
                setattr(self, "weight_hh" + suffix, Parameter(_empty(gate_size, hidden_size)))
                if bias:
                    setattr(self, "bias_ih" + suffix, Parameter(_empty(gate_size)))
                    setattr(self, "bias_hh" + suffix, Parameter(_empty(gate_size)))
        self.reset_parameters()

    def _initial_state(self, hx, batch, batched, like):
        """hx as a (layers * directions, B, H) tensor; zeros when not given."""
        directions = 2 if self.bidirectional else 1
        shape = (self.num_layers * directions, batch, self.hidden_size)
        if hx is None:
            return Tensor(xp_of(like).zeros(shape, like.dtype))
        if not isinstance(hx, Tensor):
            hx = Tensor(hx)
        if not batched:
            hx = hx.expand_dims(1)
        if hx.shape != shape:
            raise ValueError(f"{type(self).__name__}: initial state of shape {hx.shape}, expected {shape} "
                             f"(layers * directions, batch, hidden_size)")
        return hx

    def forward(self, input, hx=None):
        """input (T, B, input_size), or (B, T, input_size) with batch_first, or unbatched (T, input_size).

        Returns (output, h_n) - for LSTM (output, (h_n, c_n)) - with output (T, B, D * hidden_size)
        and h_n, c_n (num_layers * D, B, hidden_size), D = 2 if bidirectional else 1.
        """
        name = type(self).__name__
        if input.ndim not in (2, 3):
            raise ValueError(f"{name}: expected a 2-D (unbatched) or 3-D input, got shape {input.shape}")
        batched = input.ndim == 3
        if not batched:
            input = input.expand_dims(1)
        elif self.batch_first:
            input = input.transpose(1, 0, 2)
        steps, batch, features = input.shape
        if steps == 0:
            raise ValueError(f"{name}: the input sequence is empty (shape {input.shape})")
        if features != self.input_size:
            raise ValueError(f"{name}: input has {features} features, the layer expects "
                             f"input_size={self.input_size}")
        if self.mode == "LSTM":
            if hx is not None and not (isinstance(hx, (tuple, list)) and len(hx) == 2):
                raise TypeError(f"{name}: the initial state must be a tuple (h0, c0)")
            h0, c0 = (None, None) if hx is None else hx
            h_init = self._initial_state(h0, batch, batched, input)
            c_init = self._initial_state(c0, batch, batched, input)
        else:
            h_init = self._initial_state(hx, batch, batched, input)

        directions = 2 if self.bidirectional else 1
        x = input
        h_finals, c_finals = [], []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(directions):
                index = layer * directions + direction
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                bias_ih = getattr(self, "bias_ih" + suffix) if self.bias else None
                bias_hh = getattr(self, "bias_hh" + suffix) if self.bias else None
                gates_x = _input_projection(x, getattr(self, "weight_ih" + suffix),
                                            _folded_bias(self.mode, bias_ih, bias_hh))
                c0 = c_init[index] if self.mode == "LSTM" else None
                output, h_n, c_n = _run_direction(self.mode, gates_x, h_init[index], c0,
                                                  getattr(self, "weight_hh" + suffix), bias_hh,
                                                  reverse=bool(direction))
                outputs.append(output)
                h_finals.append(h_n)
                c_finals.append(c_n)
            x = outputs[0] if directions == 1 else ops.concat(outputs, axis=2)
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)

        h_n = ops.stack(h_finals, axis=0)
        c_n = ops.stack(c_finals, axis=0) if self.mode == "LSTM" else None
        if not batched:
            x, h_n = x.squeeze(1), h_n.squeeze(1)
            c_n = c_n.squeeze(1) if c_n is not None else None
        elif self.batch_first:
            x = x.transpose(1, 0, 2)
        return (x, (h_n, c_n)) if self.mode == "LSTM" else (x, h_n)

    def extra_repr(self):
        text = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            text += f", num_layers={self.num_layers}"
        if not self.bias:
            text += ", bias=False"
        if self.batch_first:
            text += ", batch_first=True"
        if self.dropout:
            text += f", dropout={self.dropout}"
        if self.bidirectional:
            text += ", bidirectional=True"
        return text


class RNN(RNNBase):
    """Elman RNN: h_t = tanh(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh) (or relu)."""

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False):
        mode = _elman_mode("RNN", nonlinearity)
        self.nonlinearity = nonlinearity
        super().__init__(mode, input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional)


class LSTM(RNNBase):
    """Long short-term memory (Hochreiter & Schmidhuber 1997, with a forget gate)."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False):
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional)


class GRU(RNNBase):
    """Gated recurrent unit (Cho et al. 2014), PyTorch's formulation."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False):
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional)


# --- cells: one time step of the same ops ------------------------------------------------


class RNNCellBase(_Recurrent):
    def __init__(self, mode, input_size, hidden_size, bias=True):
        super().__init__()
        self.mode, self.input_size, self.hidden_size, self.bias = mode, input_size, hidden_size, bias
        gate_size = _GATES[mode] * hidden_size
        self.weight_ih = Parameter(_empty(gate_size, input_size))
        self.weight_hh = Parameter(_empty(gate_size, hidden_size))
        if bias:
            self.bias_ih = Parameter(_empty(gate_size))
            self.bias_hh = Parameter(_empty(gate_size))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def _step(self, input, state):
        """Run the layer op for one step: input (B, I) or (I,), state tensors of (B, H) or (H,)."""
        name = type(self).__name__
        if input.ndim not in (1, 2):
            raise ValueError(f"{name}: expected a 1-D (unbatched) or 2-D input, got shape {input.shape}")
        if input.shape[-1] != self.input_size:
            raise ValueError(f"{name}: input has {input.shape[-1]} features, the cell expects "
                             f"input_size={self.input_size}")
        batched = input.ndim == 2
        x = input.reshape(1, -1, self.input_size)
        batch = x.shape[1]
        xp = xp_of(input)
        states = []
        shape = (batch, self.hidden_size) if batched else (self.hidden_size,)
        for s in state:
            if s is None:
                states.append(Tensor(xp.zeros((batch, self.hidden_size), input.dtype)))
                continue
            if not isinstance(s, Tensor):
                s = Tensor(s)
            if s.shape != shape:
                raise ValueError(f"{name}: state of shape {s.shape} for an input of shape {input.shape}; "
                                 f"expected {shape}")
            states.append(s.reshape(batch, self.hidden_size))
        gates_x = _input_projection(x, self.weight_ih, _folded_bias(self.mode, self.bias_ih, self.bias_hh))
        c0 = states[1] if self.mode == "LSTM" else None
        _, h, c = _run_direction(self.mode, gates_x, states[0], c0, self.weight_hh, self.bias_hh, False)
        return h.reshape(shape), (c.reshape(shape) if c is not None else None)

    def extra_repr(self):
        return f"{self.input_size}, {self.hidden_size}" + ("" if self.bias else ", bias=False")


class RNNCell(RNNCellBase):
    """One step of RNN: h' = tanh(x W_ih^T + b_ih + h W_hh^T + b_hh) (or relu)."""

    def __init__(self, input_size, hidden_size, bias=True, nonlinearity="tanh"):
        mode = _elman_mode("RNNCell", nonlinearity)
        self.nonlinearity = nonlinearity
        super().__init__(mode, input_size, hidden_size, bias)

    def forward(self, input, hx=None):
        return self._step(input, [hx])[0]


class LSTMCell(RNNCellBase):
    """One step of LSTM: returns (h', c')."""

    def __init__(self, input_size, hidden_size, bias=True):
        super().__init__("LSTM", input_size, hidden_size, bias)

    def forward(self, input, hx=None):
        if hx is not None and not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            raise TypeError("LSTMCell: the state must be a tuple (h, c)")
        return self._step(input, [None, None] if hx is None else list(hx))


class GRUCell(RNNCellBase):
    """One step of GRU: returns h'."""

    def __init__(self, input_size, hidden_size, bias=True):
        super().__init__("GRU", input_size, hidden_size, bias)

    def forward(self, input, hx=None):
        return self._step(input, [hx])[0]


def _empty(*shape):
    """Storage for a parameter that reset_parameters() fills right after."""
    return np.zeros(shape, np.float32)
