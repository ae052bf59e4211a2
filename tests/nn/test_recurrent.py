"""RNN / LSTM / GRU and their cells: the fused ops against the textbook equations (plain numpy,
one gate at a time), against PyTorch with copied weights, and by float64 gradient checks."""
import numpy as np
import pytest

import disttrain as dt
from disttrain import nn
from tests.nn.layer_check import check_layer

rng = np.random.default_rng(0)


def randn(*shape):
    return rng.standard_normal(shape)


# --- the reference: one gate at a time, straight from the equations ------------------------


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def reference_step(mode, x, h, c, w_ih, w_hh, b_ih, b_hh):
    """One time step written gate by gate (PyTorch's documented equations)."""
    def gate(k, size):
        rows = slice(k * size, (k + 1) * size)
        return x @ w_ih[rows].T + b_ih[rows], h @ w_hh[rows].T + b_hh[rows]

    hidden = w_hh.shape[1]
    if mode == "LSTM":
        i = sigmoid(sum(gate(0, hidden)))
        f = sigmoid(sum(gate(1, hidden)))
        g = np.tanh(sum(gate(2, hidden)))
        o = sigmoid(sum(gate(3, hidden)))
        c = f * c + i * g
        return o * np.tanh(c), c
    if mode == "GRU":
        r = sigmoid(sum(gate(0, hidden)))
        z = sigmoid(sum(gate(1, hidden)))
        n_x, n_h = gate(2, hidden)
        n = np.tanh(n_x + r * n_h)
        return (1 - z) * n + z * h, None
    pre = sum(gate(0, hidden))
    return (np.tanh(pre) if mode == "RNN_TANH" else np.maximum(pre, 0)), None


def reference_layer(module, x, h0, c0=None):
    """The whole stack, time step by time step: x (T, B, I), h0/c0 (L * D, B, H)."""
    state = {name: p.numpy().astype(np.float64) for name, p in module.named_parameters()}
    directions = 2 if module.bidirectional else 1
    steps = x.shape[0]
    h_n, c_n = [], []
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(directions):
            suffix = f"_l{layer}" + ("_reverse" if direction else "")
            weights = [state["weight_ih" + suffix], state["weight_hh" + suffix]]
            if module.bias:
                weights += [state["bias_ih" + suffix], state["bias_hh" + suffix]]
            else:
                weights += [np.zeros(weights[0].shape[0])] * 2
            index = layer * directions + direction
            h = h0[index]
            c = c0[index] if c0 is not None else None
            out = [None] * steps
            for t in (reversed(range(steps)) if direction else range(steps)):
                h, c = reference_step(module.mode, x[t], h, c, *weights)
                out[t] = h
            outputs.append(np.stack(out))
            h_n.append(h)
            c_n.append(c)
        x = np.concatenate(outputs, axis=2)
    return x, np.stack(h_n), (np.stack(c_n) if module.mode == "LSTM" else None)


LAYERS = {"RNN": nn.RNN, "LSTM": nn.LSTM, "GRU": nn.GRU}


def run(module, x, h0, c0):
    """module(x, state) -> (output, h_n, c_n or None) as numpy arrays."""
    state = None if h0 is None else ((dt.tensor(h0), dt.tensor(c0)) if c0 is not None else dt.tensor(h0))
    output, final = module(dt.tensor(x), state)
    h_n, c_n = final if isinstance(final, tuple) else (final, None)
    return output.numpy(), h_n.numpy(), (c_n.numpy() if c_n is not None else None)


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (2, False), (2, True)],
                         ids=["1-layer", "2-layers", "2-layers-bidirectional"])
def test_layer_matches_the_textbook_equations(name, num_layers, bidirectional):
    module = LAYERS[name](3, 5, num_layers=num_layers, bidirectional=bidirectional).double()
    layers = num_layers * (2 if bidirectional else 1)
    x, h0 = randn(6, 2, 3), randn(layers, 2, 5)
    c0 = randn(layers, 2, 5) if name == "LSTM" else None
    output, h_n, c_n = run(module, x, h0, c0)
    expected = reference_layer(module, x, h0, c0)
    assert output.shape == (6, 2, 5 * (2 if bidirectional else 1)) and h_n.shape == (layers, 2, 5)
    np.testing.assert_allclose(output, expected[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(h_n, expected[1], rtol=1e-12, atol=1e-12)
    if name == "LSTM":
        np.testing.assert_allclose(c_n, expected[2], rtol=1e-12, atol=1e-12)


def test_relu_rnn_without_bias_matches_the_equations():
    module = nn.RNN(4, 3, num_layers=2, nonlinearity="relu", bias=False).double()
    assert [name for name, _ in module.named_parameters()] == [
        "weight_ih_l0", "weight_hh_l0", "weight_ih_l1", "weight_hh_l1"]
    x, h0 = randn(5, 2, 4), randn(2, 2, 3)
    output, h_n, _ = run(module, x, h0, None)
    expected = reference_layer(module, x, h0)
    np.testing.assert_allclose(output, expected[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(h_n, expected[1], rtol=1e-12, atol=1e-12)


def test_missing_initial_state_means_zeros():
    module = nn.GRU(3, 4, num_layers=2).double()
    x = randn(4, 2, 3)
    without = run(module, x, None, None)
    with_zeros = run(module, x, np.zeros((2, 2, 4)), None)
    np.testing.assert_array_equal(without[0], with_zeros[0])


@pytest.mark.parametrize("name", LAYERS)
def test_forward_makes_one_matmul_per_step_plus_one_for_the_whole_input(name, monkeypatch):
    module = LAYERS[name](3, 4)
    x = dt.randn(7, 2, 3)
    calls = []
    original = np.matmul

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)
    monkeypatch.setattr(np, "matmul", counting)
    module(x)
    assert calls[0] == (7 * 2, 3)  # the input projection of all 7 steps at once
    assert calls[1:] == [(2, 4)] * 7  # then h @ weight_hh.T once per step, all gates together


@pytest.mark.parametrize("name", LAYERS)
def test_parameter_names_and_shapes_are_pytorchs(name):
    module = LAYERS[name](3, 4, num_layers=2, bidirectional=True)
    gates = {"RNN": 1, "LSTM": 4, "GRU": 3}[name] * 4
    shapes = dict((n, p.shape) for n, p in module.named_parameters())
    assert list(shapes)[:8] == ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0",
                                "weight_ih_l0_reverse", "weight_hh_l0_reverse", "bias_ih_l0_reverse",
                                "bias_hh_l0_reverse"]
    assert shapes["weight_ih_l0"] == (gates, 3) and shapes["weight_ih_l1"] == (gates, 8)
    assert shapes["weight_hh_l1_reverse"] == (gates, 4) and shapes["bias_hh_l1"] == (gates,)


# --- gradients ------------------------------------------------------------------------------


def call_with_state(module, x, h0, c0=None):
    return module(x, (h0, c0) if c0 is not None else h0)


@pytest.mark.parametrize("name", LAYERS)
def test_layer_gradients_of_input_state_and_parameters(name):
    module = LAYERS[name](2, 3, num_layers=2, bidirectional=True)
    inputs = [randn(3, 2, 2), randn(4, 2, 3)] + ([randn(4, 2, 3)] if name == "LSTM" else [])
    # The checked output includes h_n (and c_n), so gradients flowing in from the final
    # state - as in an encoder-decoder - are checked too.
    check_layer(module, *inputs, call=call_with_state)


def test_relu_rnn_gradients():
    x = randn(4, 2, 3)
    check_layer(nn.RNN(3, 3, nonlinearity="relu"), x, randn(1, 2, 3), call=call_with_state)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["forward", "bidirectional"])
def test_gradient_through_the_final_cell_state_alone_matches_finite_differences(bidirectional):
    # Only c_n reaches the loss: the cell-state path of backward is checked on its own, for
    # the input, the initial state and every parameter.
    module = nn.LSTM(2, 3, num_layers=2, bidirectional=bidirectional)
    states = 4 if bidirectional else 2
    check_layer(module, randn(4, 2, 2), randn(states, 2, 3), randn(states, 2, 3),
                call=lambda m, x, h0, c0: m(x, (h0, c0))[1][1])


@pytest.mark.parametrize("name", ["RNNCell", "LSTMCell", "GRUCell"])
def test_cells_match_the_equations_and_have_gradients(name):
    cell = getattr(nn, name)(3, 4).double()
    mode = cell.mode
    x, h, c = randn(2, 3), randn(2, 4), randn(2, 4)
    params = [p.numpy() for p in (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)]
    expected_h, expected_c = reference_step(mode, x, h, c if mode == "LSTM" else None, *params)
    if mode == "LSTM":
        got_h, got_c = cell(dt.tensor(x), (dt.tensor(h), dt.tensor(c)))
        np.testing.assert_allclose(got_c.data, expected_c, rtol=1e-12)
        check_layer(cell, x, h, c, call=lambda m, x, h, c: m(x, (h, c)))
    else:
        got_h = cell(dt.tensor(x), dt.tensor(h))
        check_layer(cell, x, h, call=lambda m, x, h: m(x, h))
    np.testing.assert_allclose(got_h.data, expected_h, rtol=1e-12)


def test_cells_accept_unbatched_input_and_default_state():
    cell = nn.LSTMCell(3, 4)
    h, c = cell(dt.randn(3))
    assert h.shape == c.shape == (4,)
    batched_h, _ = cell(dt.tensor(np.zeros((1, 3), np.float32)))
    np.testing.assert_allclose(cell(dt.zeros(3))[0].data, batched_h.data[0])
    assert nn.GRUCell(3, 2, bias=False)(dt.randn(5, 3)).shape == (5, 2)


# --- layout options, dropout, errors --------------------------------------------------------


def test_batch_first_and_unbatched_inputs_agree_with_time_major():
    module = nn.LSTM(3, 4, num_layers=2, bidirectional=True).double()
    x = randn(5, 2, 3)
    time_major, (h_n, c_n) = module(dt.tensor(x))
    module.batch_first = True
    batch_major, (h_b, _) = module(dt.tensor(x.transpose(1, 0, 2)))
    np.testing.assert_allclose(batch_major.data.transpose(1, 0, 2), time_major.data, rtol=1e-12)
    np.testing.assert_allclose(h_b.data, h_n.data, rtol=1e-12)
    single, (h_1, c_1) = module(dt.tensor(x[:, 0]))  # unbatched: (T, input_size)
    assert single.shape == (5, 8) and h_1.shape == c_1.shape == (4, 4)
    np.testing.assert_allclose(single.data, time_major.data[:, 0], rtol=1e-12)
    np.testing.assert_allclose(c_1.data, c_n.data[:, 0], rtol=1e-12)


def test_inter_layer_dropout_acts_in_training_only():
    module = nn.GRU(3, 6, num_layers=2, dropout=0.5)
    x = dt.randn(4, 2, 3, rng=np.random.default_rng(2))
    dt.random.manual_seed(1)
    first, _ = module(x)
    dt.random.manual_seed(2)
    second, _ = module(x)
    assert not np.allclose(first.data, second.data)
    module.eval()
    np.testing.assert_array_equal(module(x)[0].data, module(x)[0].data)
    # The last layer's output is never dropped: a one-layer stack ignores dropout.
    single = nn.LSTM(3, 4, dropout=0.5)
    np.testing.assert_array_equal(single(x)[0].data, single.eval()(x)[0].data)


def test_errors_name_the_problem():
    module = nn.LSTM(3, 4)
    with pytest.raises(ValueError, match="input has 5 features, the layer expects input_size=3"):
        module(dt.randn(2, 1, 5))
    with pytest.raises(TypeError, match=r"tuple \(h0, c0\)"):
        module(dt.randn(2, 1, 3), dt.zeros(1, 1, 4))
    with pytest.raises(ValueError, match=r"initial state of shape \(2, 1, 4\), expected \(1, 1, 4\)"):
        nn.GRU(3, 4)(dt.randn(2, 1, 3), dt.zeros(2, 1, 4))
    with pytest.raises(ValueError, match="expected a 2-D \\(unbatched\\) or 3-D input"):
        module(dt.randn(3))
    with pytest.raises(ValueError, match="the input sequence is empty"):
        module(dt.zeros(0, 2, 3))
    with pytest.raises(ValueError, match="nonlinearity must be 'tanh' or 'relu'"):
        nn.RNN(3, 4, nonlinearity="sigmoid")


# --- against PyTorch ------------------------------------------------------------------------


@pytest.mark.parametrize("name", LAYERS)
def test_layer_outputs_and_gradients_match_torch(name):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    theirs = getattr(torch.nn, name)(3, 5, num_layers=2, bidirectional=True, batch_first=True).double()
    ours = LAYERS[name](3, 5, num_layers=2, bidirectional=True, batch_first=True).double()
    ours.load_state_dict({k: v.detach().numpy() for k, v in theirs.state_dict().items()})
    x, h0 = randn(2, 7, 3), randn(4, 2, 5)
    c0 = randn(4, 2, 5) if name == "LSTM" else None

    x_t = torch.tensor(x, requires_grad=True)
    state_t = (torch.tensor(h0), torch.tensor(c0)) if c0 is not None else torch.tensor(h0)
    out_t, final_t = theirs(x_t, state_t)
    h_t = final_t[0] if name == "LSTM" else final_t
    weights_out, weights_h = randn(*out_t.shape), randn(*h_t.shape)
    ((out_t * torch.tensor(weights_out)).sum() + (h_t * torch.tensor(weights_h)).sum()).backward()

    x_d = dt.tensor(x, requires_grad=True)
    state_d = (dt.tensor(h0), dt.tensor(c0)) if c0 is not None else dt.tensor(h0)
    out_d, final_d = ours(x_d, state_d)
    h_d = final_d[0] if name == "LSTM" else final_d
    ((out_d * weights_out).sum() + (h_d * weights_h).sum()).backward()

    np.testing.assert_allclose(out_d.data, out_t.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(h_d.data, h_t.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(x_d.grad, x_t.grad.numpy(), rtol=1e-9, atol=1e-12)
    for (key, parameter), (_, reference) in zip(ours.named_parameters(), theirs.named_parameters()):
        np.testing.assert_allclose(parameter.grad, reference.grad.numpy(), rtol=1e-9, atol=1e-12, err_msg=key)


def test_float32_lstm_matches_torch_on_the_char_model_shape():
    torch = pytest.importorskip("torch")
    theirs = torch.nn.LSTM(16, 32, batch_first=True)
    ours = nn.LSTM(16, 32, batch_first=True)
    ours.load_state_dict({k: v.detach().numpy() for k, v in theirs.state_dict().items()})
    x = randn(4, 20, 16).astype(np.float32)
    out_t, _ = theirs(torch.tensor(x))
    out_t.sum().backward()
    out_d, _ = ours(dt.tensor(x))
    out_d.sum().backward()
    assert out_d.dtype == np.float32 and ours.weight_hh_l0.grad.dtype == np.float32
    np.testing.assert_allclose(out_d.data, out_t.detach().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ours.weight_hh_l0.grad, theirs.weight_hh_l0.grad.numpy(), rtol=1e-3, atol=1e-4)


def test_gradient_ready_hooks_fire_once_per_parameter_with_the_final_gradient():
    # The parameter-server client pushes each gradient from this hook, so it must see the
    # complete gradient of every LSTM weight, exactly once per backward pass.
    module = nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    seen = {}
    for name, parameter in module.named_parameters():
        parameter.register_post_accumulate_grad_hook(
            lambda p, name=name: seen.setdefault(name, []).append(p.grad.copy()))
    output, _ = module(dt.randn(5, 2, 3, rng=np.random.default_rng(3)))
    (output * output).sum().backward()
    assert sorted(seen) == sorted(name for name, _ in module.named_parameters())
    for name, parameter in module.named_parameters():
        assert len(seen[name]) == 1, name
        np.testing.assert_array_equal(seen[name][0], parameter.grad, err_msg=name)
