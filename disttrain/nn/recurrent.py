"""Recurrent layers: RNN, LSTM and GRU cells and multi-layer (bidirectional) sequence layers.

Each layer-direction is one fused op: the input projection of every time step is one big
matmul made before the time loop, and the loop itself - one ``h @ weight_hh.T`` matmul for
all gates per step, then the gate arithmetic - runs in numpy inside a single graph node whose
gradient rule is back-propagation through time written out by hand. Composing the same loop
from primitive ops costs a graph node per gate operation and a full-size gradient array per
``gates_x[t]`` slice in backward: for the char-LSTM shape (hidden 256, batch 32, 64 steps, one
BLAS thread) forward + backward measured 190 ms composed against 55 ms fused on the 2-core
development machine (266 ms against 69 ms on a quiet 16-core one).
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
from disttrain.tensor import Tensor

# --- the fused recurrences ---------------------------------------------------------------


def _step_order(length, reverse):
    """The time index of each step, in the order the recurrence visits them."""
    return list(range(length - 1, -1, -1)) if reverse else list(range(length))


def _in_time_order(per_step, reverse):
    """Arrays stacked in step order put in time order, or back (reversing undoes itself; a view)."""
    return per_step[::-1] if reverse else per_step


def _grad_if(tensor, compute):
    return compute() if tensor.requires_grad else None


def lstm_sequence(gates_x, h0, c0, weight_hh, reverse=False):
    """An LSTM over a whole sequence, as one op.

    ``gates_x`` (T, B, 4H): the input projections x_t @ W_ih.T + b_ih + b_hh of every step.
    ``h0``, ``c0`` (B, H): the initial state; ``weight_hh`` (4H, H).
    Returns one tensor of shape (T + 1, B, H): the hidden states h_t in time order, then the
    final cell state (an op has one output; the caller slices the two apart).
    """
    xp = xp_of(gates_x)
    steps, batch, gate_size = gates_x.shape
    hidden = gate_size // 4
    dtype = gates_x.dtype
    times = _step_order(steps, reverse)
    # One tanh call covers all four gates: sigmoid(z) = (tanh(z / 2) + 1) / 2, so gates i, f
    # and o are scaled by 1/2 on the way in and mapped back on the way out.
    scale = xp.full(gate_size, 0.5, dtype)
    scale[2 * hidden:3 * hidden] = 1
    shift = (1 - scale).astype(dtype)
    # C-contiguous (H, 4H): measured ~30% faster in the per-step matmul than the transposed view.
    weight_scaled = xp.ascontiguousarray(weight_hh.data.T * scale)
    gates_scaled = gates_x.data * scale                   # (T, B, 4H)

    activations = xp.empty((steps, batch, gate_size), dtype)  # i, f, g, o after their nonlinearity
    hs = xp.empty((steps + 1, batch, hidden), dtype)          # hs[k]: the state step k starts from
    cs = xp.empty((steps + 1, batch, hidden), dtype)
    tanh_cs = xp.empty((steps, batch, hidden), dtype)
    hs[0], cs[0] = h0.data, c0.data
    for k, t in enumerate(times):
        a = activations[k]
        xp.matmul(hs[k], weight_scaled, out=a)
        a += gates_scaled[t]
        xp.tanh(a, out=a)
        a *= scale
        a += shift
        i, f, g, o = a[:, :hidden], a[:, hidden:2 * hidden], a[:, 2 * hidden:3 * hidden], a[:, 3 * hidden:]
        c = cs[k + 1]
        xp.multiply(f, cs[k], out=c)
        c += i * g
        xp.tanh(c, out=tanh_cs[k])
        xp.multiply(o, tanh_cs[k], out=hs[k + 1])
    out = xp.empty((steps + 1, batch, hidden), dtype)
    out[:steps] = _in_time_order(hs[1:], reverse)
    out[steps] = cs[steps]

    def backward(grad):
        grad_h = _in_time_order(grad[:steps], reverse)  # step order
        # Local derivatives of the activations: sigmoid' = a (1 - a), tanh' = 1 - a^2.
        is_sigmoid = (scale == 0.5).astype(dtype)
        grad_gates = xp.empty((steps, batch, 4, hidden), dtype)
        dh = xp.zeros((batch, hidden), dtype)
        dc = grad[steps].astype(dtype, copy=True)
        weight = weight_hh.data
        for k in range(steps - 1, -1, -1):
            a = activations[k].reshape(batch, 4, hidden)
            i, f, g, o = a[:, 0], a[:, 1], a[:, 2], a[:, 3]
            tc = tanh_cs[k]
            dh += grad_h[k]
            dc += dh * o * (1 - tc * tc)
            d = grad_gates[k]
            xp.multiply(dc, g, out=d[:, 0])
            xp.multiply(dc, cs[k], out=d[:, 1])
            xp.multiply(dc, i, out=d[:, 2])
            xp.multiply(dh, tc, out=d[:, 3])
            dc *= f
            d = d.reshape(batch, gate_size)
            d *= activations[k] * (is_sigmoid - activations[k]) + (1 - is_sigmoid)
            dh = d @ weight
        grad_gates = grad_gates.reshape(steps, batch, gate_size)
        # The weight's gradient sums over steps: one (4H, T*B) x (T*B, H) matmul, not T small ones.
        grad_weight = _grad_if(weight_hh, lambda: grad_gates.reshape(-1, gate_size).T
                               @ hs[:steps].reshape(-1, hidden))
        return _in_time_order(grad_gates, reverse), dh, dc, grad_weight
    return Tensor.from_op(out, (gates_x, h0, c0, weight_hh), backward)


def gru_sequence(gates_x, h0, weight_hh, bias_hh=None, reverse=False):
    """A GRU over a whole sequence, as one op (PyTorch's equations, gates r, z, n).

    ``gates_x`` (T, B, 3H): x_t @ W_ih.T + b_ih. ``bias_hh`` stays outside it because the
    candidate gate multiplies it by r: n = tanh(x_n + r * (h @ W_hn.T + b_hn)).
    Returns the hidden states (T, B, H) in time order.
    """
    xp = xp_of(gates_x)
    steps, batch, gate_size = gates_x.shape
    hidden = gate_size // 3
    dtype = gates_x.dtype
    times = _step_order(steps, reverse)
    weight_t = xp.ascontiguousarray(weight_hh.data.T)  # C order: faster per-step matmul
    bias = bias_hh.data if bias_hh is not None else xp.zeros(gate_size, dtype)

    rz = xp.empty((steps, batch, 2 * hidden), dtype)        # r and z after the sigmoid
    candidates = xp.empty((steps, batch, hidden), dtype)    # n
    hidden_n = xp.empty((steps, batch, hidden), dtype)      # h @ W_hn.T + b_hn, which r scales
    hs = xp.empty((steps + 1, batch, hidden), dtype)
    hs[0] = h0.data
    for k, t in enumerate(times):
        gh = xp.matmul(hs[k], weight_t)
        gh += bias
        gx = gates_x.data[t]
        a = rz[k]
        xp.add(gx[:, :2 * hidden], gh[:, :2 * hidden], out=a)
        # sigmoid(z) = (tanh(z / 2) + 1) / 2: one transcendental call, no overflow.
        a *= 0.5
        xp.tanh(a, out=a)
        a *= 0.5
        a += 0.5
        r, z = a[:, :hidden], a[:, hidden:]
        hidden_n[k] = gh[:, 2 * hidden:]
        n = candidates[k]
        xp.multiply(r, hidden_n[k], out=n)
        n += gx[:, 2 * hidden:]
        xp.tanh(n, out=n)
        # h' = (1 - z) * n + z * h
        h = hs[k + 1]
        xp.subtract(hs[k], n, out=h)
        h *= z
        h += n
    out = _in_time_order(hs[1:], reverse).copy()

    def backward(grad):
        grad_h = _in_time_order(grad, reverse)
        grad_gates_h = xp.empty((steps, batch, gate_size), dtype)  # w.r.t. h @ W_hh.T + b_hh
        grad_gates_x = xp.empty((steps, batch, gate_size), dtype)
        dh = xp.zeros((batch, hidden), dtype)
        weight = weight_hh.data
        for k in range(steps - 1, -1, -1):
            r, z = rz[k, :, :hidden], rz[k, :, hidden:]
            n = candidates[k]
            dh += grad_h[k]
            dn = dh * (1 - z) * (1 - n * n)                   # through tanh, pre-activation
            dz = dh * (hs[k] - n) * z * (1 - z)
            dr = dn * hidden_n[k] * r * (1 - r)
            gx, gh = grad_gates_x[k], grad_gates_h[k]
            gx[:, :hidden] = dr
            gx[:, hidden:2 * hidden] = dz
            gx[:, 2 * hidden:] = dn
            gh[:, :2 * hidden] = gx[:, :2 * hidden]
            xp.multiply(dn, r, out=gh[:, 2 * hidden:])
            dh = dh * z + gh @ weight
        flat_gh = grad_gates_h.reshape(-1, gate_size)
        grad_weight = _grad_if(weight_hh, lambda: flat_gh.T @ hs[:steps].reshape(-1, hidden))
        grads = (_in_time_order(grad_gates_x, reverse), dh, grad_weight)
        if bias_hh is not None:
            grads += (_grad_if(bias_hh, lambda: flat_gh.sum(axis=0)),)
        return grads
    parents = (gates_x, h0, weight_hh) + ((bias_hh,) if bias_hh is not None else ())
    return Tensor.from_op(out, parents, backward)


def rnn_sequence(gates_x, h0, weight_hh, nonlinearity="tanh", reverse=False):
    """An Elman RNN over a whole sequence, as one op: h_t = act(x_t @ W_ih.T + b + h @ W_hh.T).

    ``gates_x`` (T, B, H) holds x_t @ W_ih.T + b_ih + b_hh. Returns (T, B, H) in time order.
    """
    xp = xp_of(gates_x)
    steps, batch, hidden = gates_x.shape
    dtype = gates_x.dtype
    times = _step_order(steps, reverse)
    weight_t = xp.ascontiguousarray(weight_hh.data.T)  # C order: faster per-step matmul
    hs = xp.empty((steps + 1, batch, hidden), dtype)
    hs[0] = h0.data
    for k, t in enumerate(times):
        h = hs[k + 1]
        xp.matmul(hs[k], weight_t, out=h)
        h += gates_x.data[t]
        if nonlinearity == "tanh":
            xp.tanh(h, out=h)
        else:
            xp.maximum(h, 0, out=h)
    out = _in_time_order(hs[1:], reverse).copy()

    def backward(grad):
        grad_h = _in_time_order(grad, reverse)
        grad_pre = xp.empty((steps, batch, hidden), dtype)
        dh = xp.zeros((batch, hidden), dtype)
        weight = weight_hh.data
        for k in range(steps - 1, -1, -1):
            dh += grad_h[k]
            h = hs[k + 1]
            d = grad_pre[k]
            if nonlinearity == "tanh":
                xp.multiply(dh, 1 - h * h, out=d)
            else:
                xp.multiply(dh, h > 0, out=d)
            dh = d @ weight
        grad_weight = _grad_if(weight_hh, lambda: grad_pre.reshape(-1, hidden).T
                               @ hs[:steps].reshape(-1, hidden))
        return _in_time_order(grad_pre, reverse), dh, grad_weight
    return Tensor.from_op(out, (gates_x, h0, weight_hh), backward)


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


class RNNBase(Module):
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

    def reset_parameters(self):
        bound = 1 / math.sqrt(self.hidden_size)
        for parameter in self.parameters():
            init.uniform_(parameter, -bound, bound)

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
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"RNN: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__("RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU", input_size, hidden_size,
                         num_layers, bias, batch_first, dropout, bidirectional)


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


class RNNCellBase(Module):
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

    def reset_parameters(self):
        bound = 1 / math.sqrt(self.hidden_size)
        for parameter in self.parameters():
            init.uniform_(parameter, -bound, bound)

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
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"RNNCell: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__("RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU", input_size, hidden_size, bias)

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
