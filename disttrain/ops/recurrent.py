"""The fused recurrences: an RNN, LSTM or GRU over a whole sequence as one op.

Each is one graph node: the time loop - one ``h @ weight_hh.T`` matmul for all gates per
step, then the gate arithmetic - runs in numpy, and the gradient rule is back-propagation
through time written out by hand. Fused because composing the loop from primitive ops costs
a graph node per gate operation and a full-size gradient array per ``gates_x[t]`` slice
(several times slower for the char-LSTM shape, see docs/performance.md). The layers in
``disttrain.nn.recurrent`` make the input projection (one big matmul for every step) and call these.
"""
from disttrain.ops.operands import xp_of
from disttrain.tensor import Tensor

# --- helpers --------------------------------------------------------------------------------


def _step_order(length, reverse):
    """The time index of each step, in the order the recurrence visits them."""
    return list(range(length - 1, -1, -1)) if reverse else list(range(length))


def _in_time_order(per_step, reverse):
    """Arrays stacked in step order put in time order, or back (reversing undoes itself; a view)."""
    return per_step[::-1] if reverse else per_step


def _grad_if(tensor, compute):
    return compute() if tensor.requires_grad else None


# --- LSTM -----------------------------------------------------------------------------------


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
    # C-contiguous (H, 4H): a faster per-step matmul than the transposed view (docs/performance.md).
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


# --- GRU ------------------------------------------------------------------------------------


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


# --- Elman RNN (tanh or relu) -------------------------------------------------------------


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
