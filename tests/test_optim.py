"""Optimizer rules against hand-computed steps and torch.optim; classes, sparse rows, state."""
import math

import msgpack
import numpy as np
import pytest

import disttrain as dt
from disttrain import optim
from disttrain.optim import rules
from disttrain.tensor import RowSparseGrad


def _param(values, dtype=np.float64):
    return dt.tensor(np.array(values, dtype=dtype), requires_grad=True)


def _run(optimizer_class, grads, start=(1.0, -2.0), **hyper):
    """Take one step per gradient in ``grads``; return the parameter after each step."""
    p = _param(start)
    opt = optimizer_class([p], **hyper)
    history = []
    for grad in grads:
        p.grad = np.array(grad, dtype=np.float64)
        opt.step()
        history.append(p.data.copy())
    return history


# --- hand-computed steps ---------------------------------------------------------------------

def test_sgd_plain_step_is_param_minus_lr_times_grad():
    (after,) = _run(optim.SGD, [[0.5, -1.0]], lr=0.1)
    np.testing.assert_allclose(after, [1.0 - 0.05, -2.0 + 0.1])


def test_sgd_momentum_buffer_starts_at_first_grad_then_decays_with_dampening():
    # buf1 = g1 = 1; buf2 = 0.9*1 + (1-0.5)*2 = 1.9; x: 1 - 0.1*1 = 0.9; 0.9 - 0.1*1.9 = 0.71
    history = _run(optim.SGD, [[1.0], [2.0]], start=[1.0], lr=0.1, momentum=0.9, dampening=0.5)
    np.testing.assert_allclose(np.concatenate(history), [0.9, 0.71])


def test_sgd_nesterov_and_weight_decay_follow_torch_formula():
    # g = 1 + 0.1*1 = 1.1; buf = 1.1; nesterov step g + 0.9*buf = 2.09; x = 1 - 0.1*2.09
    (after,) = _run(optim.SGD, [[1.0]], start=[1.0], lr=0.1, momentum=0.9, nesterov=True,
                    weight_decay=0.1)
    np.testing.assert_allclose(after, [1.0 - 0.209])


def test_adam_two_steps_match_bias_corrected_moments():
    lr, b1, b2, eps = 0.1, 0.9, 0.999, 1e-8
    history = _run(optim.Adam, [[2.0], [-1.0]], start=[1.0], lr=lr, betas=(b1, b2), eps=eps)
    # step 1: m = 0.2, v = 0.004 -> m_hat = 2, v_hat = 4 -> x = 1 - 0.1 * 2 / (2 + eps)
    x1 = 1.0 - lr * 2.0 / (2.0 + eps)
    # step 2: m = 0.9*0.2 - 0.1 = 0.08, v = 0.999*0.004 + 0.001 = 0.004996
    m, v = 0.08, 0.004996
    x2 = x1 - lr / (1 - b1 ** 2) * m / (math.sqrt(v) / math.sqrt(1 - b2 ** 2) + eps)
    np.testing.assert_allclose(np.concatenate(history), [x1, x2], rtol=1e-12)


def test_adamw_decays_the_parameter_outside_the_moments():
    (after,) = _run(optim.AdamW, [[2.0]], start=[1.0], lr=0.1, weight_decay=0.5)
    # x *= 1 - 0.1*0.5, then the Adam step of -lr * sign(g) (m_hat / sqrt(v_hat) = 1)
    np.testing.assert_allclose(after, [0.95 - 0.1 * 2.0 / (2.0 + 1e-8)])


def test_adam_weight_decay_is_an_l2_term_in_the_gradient():
    (with_decay,) = _run(optim.Adam, [[0.0]], start=[1.0], lr=0.1, weight_decay=0.5)
    (plain,) = _run(optim.Adam, [[0.5]], start=[1.0], lr=0.1)
    np.testing.assert_allclose(with_decay, plain)


def test_rmsprop_centered_with_momentum_step():
    lr, alpha, eps, mom = 0.01, 0.9, 1e-8, 0.5
    history = _run(optim.RMSprop, [[2.0], [1.0]], start=[1.0], lr=lr, alpha=alpha, eps=eps,
                   momentum=mom, centered=True)
    sq, ga, buf, x = 0.0, 0.0, 0.0, 1.0
    expected = []
    for g in (2.0, 1.0):  # the textbook recursion, written out
        sq = alpha * sq + (1 - alpha) * g * g
        ga = alpha * ga + (1 - alpha) * g
        buf = mom * buf + g / (math.sqrt(sq - ga * ga) + eps)
        x -= lr * buf
        expected.append(x)
    np.testing.assert_allclose(np.concatenate(history), expected, rtol=1e-12)


def test_rmsprop_plain_first_step_divides_by_root_of_scaled_square():
    (after,) = _run(optim.RMSprop, [[2.0]], start=[1.0], lr=0.01, alpha=0.99)
    np.testing.assert_allclose(after, [1.0 - 0.01 * 2.0 / (math.sqrt(0.01 * 4.0) + 1e-8)])


def test_adagrad_accumulates_squares_and_decays_lr():
    lr, decay, init, eps = 0.5, 0.1, 0.25, 1e-10
    history = _run(optim.Adagrad, [[1.0], [2.0]], start=[1.0], lr=lr, lr_decay=decay,
                   initial_accumulator_value=init, eps=eps)
    x1 = 1.0 - lr * 1.0 / (math.sqrt(0.25 + 1.0) + eps)
    x2 = x1 - lr / (1 + decay) * 2.0 / (math.sqrt(0.25 + 1.0 + 4.0) + eps)
    np.testing.assert_allclose(np.concatenate(history), [x1, x2], rtol=1e-12)


# --- against torch.optim ---------------------------------------------------------------------

TORCH_CASES = [
    ("SGD", {"lr": 0.1}),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}),
    ("SGD", {"lr": 0.05, "momentum": 0.8, "nesterov": True}),
    ("Adam", {"lr": 0.01}),
    ("Adam", {"lr": 0.02, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1}),
    ("AdamW", {"lr": 0.01}),
    ("AdamW", {"lr": 0.03, "betas": (0.5, 0.9), "weight_decay": 0.2}),
    ("RMSprop", {"lr": 0.01}),
    ("RMSprop", {"lr": 0.01, "alpha": 0.9, "momentum": 0.5, "centered": True, "weight_decay": 0.1}),
    ("Adagrad", {"lr": 0.1}),
    ("Adagrad", {"lr": 0.1, "lr_decay": 0.05, "initial_accumulator_value": 0.3, "weight_decay": 0.1}),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name,hyper", TORCH_CASES)
def test_optimizer_matches_torch_optim_over_five_steps(name, hyper, dtype):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    start = rng.standard_normal((3, 4)).astype(dtype)
    grads = rng.standard_normal((5, 3, 4)).astype(dtype)
    ours = dt.tensor(start.copy(), requires_grad=True)
    theirs = torch.nn.Parameter(torch.from_numpy(start.copy()))
    ours_opt = getattr(optim, name)([ours], **hyper)
    theirs_opt = getattr(torch.optim, name)([theirs], **hyper)
    for grad in grads:
        ours.grad = grad.copy()
        theirs.grad = torch.from_numpy(grad.copy())
        ours_opt.step()
        theirs_opt.step()
        assert ours.data.dtype == dtype
        tolerance = 1e-12 if dtype == np.float64 else 1e-5
        np.testing.assert_allclose(ours.data, theirs.detach().numpy(), rtol=tolerance, atol=tolerance)


# --- sparse rows, server chunks, state --------------------------------------------------------

@pytest.mark.parametrize("name,hyper", [("sgd", {"lr": 0.1, "momentum": 0.9, "dampening": 0.2}),
                                        ("adam", {"lr": 0.01, "betas": (0.9, 0.99)}),
                                        ("adagrad", {"lr": 0.1, "initial_accumulator_value": 0.2})])
def test_apply_rows_equals_dense_rule_on_those_rows_and_leaves_others(name, hyper):
    rule = rules.RULES[name]
    rng = np.random.default_rng(1)
    param = rng.standard_normal((6, 3))
    untouched = param.copy()
    rows = np.array([1, 4])
    sparse_state, row_state = {}, {}
    row_param = param[rows].copy()
    for _ in range(3):  # rows 1 and 4 updated every step: the same as a dense (2, 3) parameter
        row_grads = rng.standard_normal((2, 3))
        rules.apply_rows(rule, param, rows, row_grads, sparse_state, **hyper)
        rule(row_param, row_grads, row_state, **hyper)
    np.testing.assert_allclose(param[rows], row_param, rtol=1e-14)
    others = [0, 2, 3, 5]
    np.testing.assert_array_equal(param[others], untouched[others])
    np.testing.assert_array_equal(sparse_state["step"], [0, 3, 0, 0, 3, 0])


def test_apply_rows_bias_corrects_a_late_row_by_its_own_step_count():
    hyper = {"lr": 0.1, "betas": (0.9, 0.999)}
    param = np.zeros((3, 2))
    state = {}
    for _ in range(4):
        rules.apply_rows(rules.adam, param, np.array([0]), np.ones((1, 2)), state, **hyper)
    grad = np.array([[0.5, -2.0]])
    rules.apply_rows(rules.adam, param, np.array([0, 2]), np.vstack([np.ones((1, 2)), grad]), state, **hyper)
    fresh = np.zeros((1, 2))
    rules.adam(fresh, grad, {}, **hyper)  # row 2's first step, bias-corrected as step 1
    np.testing.assert_allclose(param[2:], fresh, rtol=1e-14)
    np.testing.assert_array_equal(state["step"], [5, 0, 1])


def test_apply_rows_with_all_rows_equals_dense_update_after_dense_steps():
    rng = np.random.default_rng(2)
    dense = rng.standard_normal((4, 3))
    lazy = dense.copy()
    dense_state, lazy_state = {}, {}
    hyper = {"lr": 0.05, "alpha": 0.9, "centered": True, "momentum": 0.3}
    for step in range(4):
        grad = rng.standard_normal((4, 3))
        rules.rmsprop(dense, grad, dense_state, **hyper)
        if step < 2:  # the lazy copy switches from dense updates to apply_rows midway
            rules.rmsprop(lazy, grad, lazy_state, **hyper)
        else:
            rules.apply_rows(rules.rmsprop, lazy, np.arange(4), grad, lazy_state, **hyper)
    np.testing.assert_allclose(lazy, dense, rtol=1e-13)


def test_apply_rows_after_dense_steps_on_the_flattened_key_updates_the_right_rows():
    rng = np.random.default_rng(5)
    lazy = rng.standard_normal((4, 3))
    reference = lazy.copy()
    lazy_state, reference_state = {}, {}
    grad = rng.standard_normal((4, 3))
    rules.adam(lazy.reshape(-1), grad.reshape(-1), lazy_state, lr=0.1)  # as a server does
    rules.adam(reference, grad, reference_state, lr=0.1)
    rows, row_grads = np.array([0, 2]), rng.standard_normal((2, 3))
    rules.apply_rows(rules.adam, lazy, rows, row_grads, lazy_state, lr=0.1)
    rules.apply_rows(rules.adam, reference, rows, row_grads, reference_state, lr=0.1)
    np.testing.assert_array_equal(lazy, reference)
    np.testing.assert_array_equal(lazy_state["exp_avg"].reshape(4, 3), reference_state["exp_avg"])


@pytest.mark.parametrize("name", sorted(rules.RULES))
def test_rule_on_flat_chunks_equals_rule_on_whole_parameter(name):
    rng = np.random.default_rng(3)
    whole = rng.standard_normal((4, 5)).astype(np.float32)
    flat = whole.copy().reshape(-1)
    chunks = [flat[:7], flat[7:]]  # views, as a server owns slices of a flattened key
    whole_state, chunk_states = {}, [{}, {}]
    for _ in range(3):
        grad = rng.standard_normal((4, 5)).astype(np.float32)
        rules.RULES[name](whole, grad, whole_state, lr=0.01)
        flat_grad = grad.reshape(-1)
        for chunk, state, grad_chunk in zip(chunks, chunk_states, (flat_grad[:7], flat_grad[7:])):
            rules.RULES[name](chunk, grad_chunk, state, lr=0.01)
    assert flat.dtype == np.float32
    np.testing.assert_array_equal(flat.reshape(4, 5), whole)


def test_step_with_row_sparse_grad_updates_only_its_rows_in_place():
    weight = dt.tensor(np.ones((5, 2), dtype=np.float32), requires_grad=True)
    array = weight.data
    opt = optim.Adam([weight], lr=0.1)
    weight.grad = RowSparseGrad(np.array([0, 3], dtype=np.int64), np.ones((2, 2), np.float32), (5, 2))
    opt.step()
    assert weight.data is array and array.dtype == np.float32
    np.testing.assert_allclose(array[[0, 3]], 0.9, rtol=1e-6)
    np.testing.assert_array_equal(array[[1, 2, 4]], 1.0)


def test_dense_grad_after_sparse_steps_keeps_per_row_bias_correction():
    weight = dt.tensor(np.zeros((3, 2)), requires_grad=True)
    reference, reference_state = np.zeros((3, 2)), {}
    opt = optim.Adam([weight], lr=0.1)
    weight.grad = RowSparseGrad(np.array([1], dtype=np.int64), np.ones((1, 2)), (3, 2))
    opt.step()
    rules.apply_rows(rules.adam, reference, np.array([1]), np.ones((1, 2)), reference_state, lr=0.1)
    dense = np.arange(6.0).reshape(3, 2)
    weight.grad = dense
    opt.step()
    rules.apply_rows(rules.adam, reference, np.arange(3), dense, reference_state, lr=0.1)
    np.testing.assert_array_equal(weight.data, reference)
    np.testing.assert_array_equal(opt.state[0]["step"], [1, 2, 1])


def test_step_skips_parameters_without_grad_and_zero_grad_sets_none():
    a, b = _param([1.0]), _param([2.0])
    opt = optim.SGD([a, b], lr=1.0)
    a.grad = np.array([0.5])
    opt.step()
    assert a.data[0] == 0.5 and b.data[0] == 2.0
    opt.zero_grad()
    assert a.grad is None and b.grad is None


def test_param_groups_use_their_own_hyper_parameters():
    a, b = _param([1.0]), _param([1.0])
    opt = optim.SGD([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=0.1)
    a.grad, b.grad = np.array([1.0]), np.array([1.0])
    opt.step()
    assert a.data[0] == pytest.approx(0.9) and b.data[0] == pytest.approx(0.5)
    assert opt.config(group=1)["hyper"]["lr"] == 0.5


def test_config_is_msgpack_able_and_drives_the_same_rule():
    p = _param([[1.0, 2.0], [3.0, 4.0]])
    opt = optim.AdamW([p], lr=0.01, betas=(0.8, 0.95))
    config = msgpack.unpackb(msgpack.packb(opt.config()))
    assert config["name"] == "adamw" and config["hyper"]["betas"] == [0.8, 0.95]
    server_copy, server_state = p.data.copy(), {}
    grad = np.array([[0.1, -0.2], [0.3, 0.4]])
    p.grad = grad
    opt.step()
    rules.RULES[config["name"]](server_copy, grad, server_state, **config["hyper"])
    np.testing.assert_array_equal(server_copy, p.data)


def test_state_dict_round_trip_continues_identically():
    rng = np.random.default_rng(4)
    grads = rng.standard_normal((6, 3))
    straight = _param([0.1, 0.2, 0.3])
    straight_opt = optim.RMSprop([straight], lr=0.01, momentum=0.9, centered=True)
    resumed = _param([0.1, 0.2, 0.3])
    first_opt = optim.RMSprop([resumed], lr=0.01, momentum=0.9, centered=True)
    for i, grad in enumerate(grads):
        straight.grad = grad
        straight_opt.step()
        if i == 3:  # hand the state over to a fresh optimizer, through msgpack-like plain values
            saved = first_opt.state_dict()
            saved = {"state": {str(k): {n: (v.copy() if hasattr(v, "copy") else v) for n, v in s.items()}
                               for k, s in saved["state"].items()},
                     "param_groups": saved["param_groups"]}
            first_opt = optim.RMSprop([resumed], lr=0.5)
            first_opt.load_state_dict(saved)
        resumed.grad = grad
        first_opt.step()
    np.testing.assert_array_equal(resumed.data, straight.data)
    assert first_opt.param_groups[0]["lr"] == 0.01


def test_load_state_dict_rejects_mismatched_shapes_naming_them():
    opt = optim.Adam([_param([1.0, 2.0])])
    state = {"state": {0: {"step": 1, "exp_avg": np.zeros(3), "exp_avg_sq": np.zeros(3)}},
             "param_groups": [{"lr": 0.1, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0,
                               "params": [0]}]}
    with pytest.raises(ValueError, match=r"\(3,\).*\(2,\)"):
        opt.load_state_dict(state)


@pytest.mark.parametrize("make,message", [
    (lambda p: optim.SGD([p], lr=-0.1), "lr=-0.1"),
    (lambda p: optim.Adam([p], betas=(0.9, 1.0)), r"betas=\(0.9, 1.0\)"),
    (lambda p: optim.Adam([p], betas=(0.9,)), r"betas=\(0.9,\)"),
    (lambda p: optim.Adam([], lr=0.1), "empty"),
    (lambda p: optim.SGD([p], lr=0.1, nesterov=True), "momentum=0"),
    (lambda p: optim.RMSprop([p], alpha=-1), "alpha=-1"),
    (lambda p: optim.SGD([p, p], lr=0.1), "appears twice"),
], ids=["negative-lr", "beta-one", "one-beta", "no-params", "nesterov-without-momentum", "negative-alpha",
        "duplicate-param"])
def test_invalid_hyper_parameters_raise_value_error_naming_the_value(make, message):
    with pytest.raises(ValueError, match=message):
        make(_param([1.0]))
