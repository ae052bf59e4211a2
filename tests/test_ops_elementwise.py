"""Gradient checks for arithmetic and activations, on broadcast and non-contiguous inputs."""
import math

import numpy as np
import pytest

import disttrain as dt
from disttrain import ops
from disttrain.ops import special
from tests.gradcheck import gradcheck

rng = np.random.default_rng(0)


def randn(*shape):
    return rng.standard_normal(shape)


def away_from_zero(*shape, margin=0.1):
    """Random values at least ``margin`` from 0, so kinks (relu, abs) stay out of the
    finite-difference stencil."""
    return rng.choice([-1.0, 1.0], shape) * (margin + rng.random(shape))


def positive(*shape):
    return 0.5 + rng.random(shape)


BROADCAST_PAIRS = [((3, 4), (3, 4)), ((3, 4), (4,)), ((2, 1, 4), (3, 1)), ((), (2, 3)), ((5, 1), (1, 6))]


@pytest.mark.parametrize("name", ["add", "sub", "mul", "div"])
@pytest.mark.parametrize("shapes", BROADCAST_PAIRS)
def test_binary_arithmetic_gradient_with_broadcasting(name, shapes):
    a, b = randn(*shapes[0]), positive(*shapes[1])
    gradcheck(getattr(ops, name), a, b)


@pytest.mark.parametrize("name", ["add", "sub", "mul", "div"])
def test_binary_arithmetic_gradient_on_non_contiguous_inputs(name):
    # x.T and x[:, ::2] are strided views: the rules must not assume C order.
    gradcheck(lambda a, b: getattr(ops, name)(a.T, b[:, ::2]), randn(4, 3), positive(3, 8))


def test_operators_gradient_with_numbers_on_either_side():
    gradcheck(lambda x: (2 - x) * 3 / (x * x + 1) + 1.5 ** x - x / 4, randn(3, 2))


def test_neg_gradient():
    gradcheck(ops.neg, randn(3, 4))
    gradcheck(lambda x: -x[::2], randn(6, 2))


@pytest.mark.parametrize("exponent", [2, 3, 0.5, -1.5])
def test_pow_with_number_exponent_gradient(exponent):
    gradcheck(lambda x: x ** exponent, positive(3, 4))


def test_pow_with_tensor_exponent_gradient_broadcast():
    gradcheck(ops.pow, positive(2, 3), randn(3))
    gradcheck(lambda base, e: base.T ** e, positive(3, 2), randn(2, 1))


@pytest.mark.parametrize("name, make", [("exp", randn), ("log", positive), ("sqrt", positive),
                                        ("abs", away_from_zero)])
def test_unary_math_gradient(name, make):
    gradcheck(getattr(ops, name), make(4, 5))
    gradcheck(lambda x: getattr(ops, name)(x.T), make(4, 5))


@pytest.mark.parametrize("name", ["maximum", "minimum"])
@pytest.mark.parametrize("shapes", [((3, 4), (3, 4)), ((3, 4), (4,)), ((2, 1), (1, 5))])
def test_maximum_minimum_gradient(name, shapes):
    # Integers plus fractions in [0, 0.1) and [0.5, 0.6): a and b never come within 0.4,
    # so no tie sits inside the finite-difference stencil, yet either side can win.
    a = rng.integers(-4, 5, shapes[0]) + 0.1 * rng.random(shapes[0])
    b = rng.integers(-4, 5, shapes[1]) + 0.5 + 0.1 * rng.random(shapes[1])
    gradcheck(getattr(ops, name), a, b)


def test_maximum_ties_send_the_gradient_to_the_first_argument():
    a, b = dt.tensor(np.ones(3), requires_grad=True), dt.tensor(np.ones(3), requires_grad=True)
    ops.maximum(a, b).sum().backward()
    np.testing.assert_array_equal(a.grad, np.ones(3))
    np.testing.assert_array_equal(b.grad, np.zeros(3))


def test_where_gradient_broadcast_and_condition_not_differentiated():
    condition = rng.random((3, 4)) < 0.5
    gradcheck(lambda a, b: ops.where(condition, a, b), randn(3, 4), randn(4))
    gradcheck(lambda a, b: ops.where(dt.tensor(condition), a.T, b), randn(4, 3), randn(1))


def test_clip_gradient_zero_outside_the_range():
    x = randn(5, 4) * 2
    x[np.abs(np.abs(x) - 1) < 0.05] = 0.3  # keep away from the clip edges
    gradcheck(lambda t: ops.clip(t, -1, 1), x)
    gradcheck(lambda t: ops.clip(t[:, ::2], a_min=0.0), x)
    gradcheck(lambda t: t.clip(a_max=0.5), np.where(np.abs(x - 0.5) < 0.05, 0.0, x))


@pytest.mark.parametrize("name", ["tanh", "sigmoid", "gelu", "softplus"])
def test_smooth_activation_gradient(name):
    gradcheck(getattr(ops, name), randn(4, 5) * 3)
    gradcheck(lambda x: getattr(ops, name)(x[::2].T), randn(6, 3))


@pytest.mark.parametrize("name", ["relu", "leaky_relu"])
def test_piecewise_activation_gradient(name):
    gradcheck(getattr(ops, name), away_from_zero(4, 5))
    gradcheck(lambda x: getattr(ops, name)(x.T), away_from_zero(3, 4))


def test_leaky_relu_slope_gradient():
    gradcheck(lambda x: ops.leaky_relu(x, 0.2), away_from_zero(10))


def test_gelu_tanh_form_gradient():
    gradcheck(lambda x: ops.gelu(x, approximate="tanh"), randn(4, 5) * 3)


def test_erfc_matches_math_erfc_to_double_precision():
    x = np.concatenate([np.linspace(-26, 26, 200001), [0.0, -0.0, 0.46875, -0.46875, 4.0, -4.0]])
    expected = np.array([math.erfc(v) for v in x])
    np.testing.assert_allclose(special.erfc(x), expected, rtol=1e-14, atol=0)
    np.testing.assert_array_equal(special.erfc(np.array([np.inf, -np.inf, 40.0])), [0.0, 2.0, 0.0])
    assert np.isnan(special.erfc(np.array([np.nan]))).all()


def test_exact_gelu_matches_the_erf_formula_on_a_dense_grid():
    x = np.linspace(-12, 12, 120001)
    expected = np.array([v * math.erfc(-v / math.sqrt(2)) / 2 for v in x])
    np.testing.assert_allclose(ops.gelu(dt.tensor(x)).data, expected, rtol=1e-13, atol=1e-300)
    assert ops.gelu(dt.tensor(x.astype(np.float32))).dtype == np.float32


def test_exact_gelu_matches_torch_default_gelu_in_float64():
    torch = pytest.importorskip("torch")
    x = np.linspace(-10, 10, 20001)
    ours = dt.tensor(x, requires_grad=True)
    theirs = torch.tensor(x, requires_grad=True)
    out, out_t = ops.gelu(ours), torch.nn.functional.gelu(theirs)
    np.testing.assert_allclose(out.data, out_t.detach().numpy(), rtol=0, atol=1e-6)
    weights = randn(x.size)
    (out * weights).sum().backward()
    (out_t * torch.tensor(weights)).sum().backward()
    np.testing.assert_allclose(ours.grad, theirs.grad.numpy(), rtol=0, atol=1e-6)


def test_gelu_refuses_an_unknown_approximation():
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh', got 'fast'"):
        ops.gelu(dt.tensor(np.ones(2)), approximate="fast")


def test_sigmoid_and_softplus_do_not_overflow_for_large_inputs():
    x = dt.tensor(np.array([-1000.0, -50.0, 0.0, 50.0, 1000.0]), requires_grad=True)
    s = ops.sigmoid(x)
    sp = ops.softplus(x)
    assert np.all(np.isfinite(s.data)) and np.all(np.isfinite(sp.data))
    np.testing.assert_allclose(sp.data, [0.0, np.log1p(np.exp(-50.0)), np.log(2), 50.0, 1000.0], atol=1e-12)
    (s + sp).sum().backward()
    assert np.all(np.isfinite(x.grad))


def test_astype_gradient_returns_in_the_source_dtype():
    x = dt.tensor(randn(3), requires_grad=True)
    y = x.astype(np.float32)
    assert y.dtype == np.float32
    (y * 2).sum().backward()
    assert x.grad.dtype == np.float64
    np.testing.assert_allclose(x.grad, np.full(3, 2.0))
