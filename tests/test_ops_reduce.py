"""Gradient checks for reductions and the softmax family: axis, tuple axes, negative axes,
keepdims and strided inputs."""
import numpy as np
import pytest

import disttrain as dt
from disttrain import ops
from tests.gradcheck import gradcheck

rng = np.random.default_rng(1)

AXES = [None, 0, -1, 1, (0, 2), (-1, -3), (1, -1)]


def distinct(*shape):
    """Values with no ties (a shuffled grid plus jitter): max/min have one winner per slice."""
    values = np.arange(np.prod(shape), dtype=np.float64) * 0.5 + 0.1 * rng.random(np.prod(shape))
    return rng.permutation(values).reshape(shape)


@pytest.mark.parametrize("name", ["sum", "mean", "max", "min"])
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("keepdims", [False, True])
def test_reduction_gradient(name, axis, keepdims):
    out = gradcheck(lambda x: getattr(ops, name)(x, axis, keepdims), distinct(2, 3, 4))
    assert out.shape == getattr(np, name)(np.zeros((2, 3, 4)), axis=axis, keepdims=keepdims).shape


@pytest.mark.parametrize("name", ["sum", "mean", "max", "min"])
def test_reduction_gradient_on_strided_input(name):
    gradcheck(lambda x: getattr(x[:, ::2].T, name)(axis=-1), distinct(3, 8))


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("ddof", [0, 1])
def test_var_gradient(axis, ddof):
    gradcheck(lambda x: ops.var(x, axis, keepdims=False, ddof=ddof), rng.standard_normal((2, 3, 4)))
    gradcheck(lambda x: x.var(axis=axis, keepdims=True, ddof=ddof), rng.standard_normal((2, 3, 4)))


def test_var_matches_numpy():
    x = rng.standard_normal((4, 5))
    np.testing.assert_allclose(dt.tensor(x).var(axis=0, ddof=1).data, x.var(axis=0, ddof=1))


def test_max_ties_share_the_gradient_equally():
    x = dt.tensor(np.array([[1.0, 3.0, 3.0], [2.0, 0.0, 1.0]]), requires_grad=True)
    x.max(axis=1).sum().backward()
    np.testing.assert_allclose(x.grad, [[0, 0.5, 0.5], [1, 0, 0]])


@pytest.mark.parametrize("axis", [None, 0, -1, (0, 1)])
@pytest.mark.parametrize("keepdims", [False, True])
def test_logsumexp_gradient(axis, keepdims):
    x = rng.standard_normal((3, 4)) * 3
    out = gradcheck(lambda t: ops.logsumexp(t, axis, keepdims), x)
    np.testing.assert_allclose(out.data, np.log(np.exp(x).sum(axis=axis, keepdims=keepdims)))


def test_logsumexp_is_stable_for_large_values():
    x = np.array([1000.0, 1000.0, -1000.0])
    np.testing.assert_allclose(ops.logsumexp(dt.tensor(x)).data, 1000 + np.log(2))


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_softmax_family_gradient(name, axis):
    gradcheck(lambda x: getattr(ops, name)(x, axis=axis), rng.standard_normal((3, 4, 2)) * 2)


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_softmax_family_gradient_on_strided_input(name):
    gradcheck(lambda x: getattr(ops, name)(x.T[::2], axis=-1), rng.standard_normal((5, 6)))


def test_softmax_and_log_softmax_agree_and_survive_large_logits():
    x = np.array([[1000.0, 0.0, -1000.0], [1.0, 2.0, 3.0]])
    p = ops.softmax(dt.tensor(x)).data
    log_p = ops.log_softmax(dt.tensor(x)).data
    assert np.all(np.isfinite(log_p))
    np.testing.assert_allclose(p.sum(axis=-1), 1)
    np.testing.assert_allclose(np.exp(log_p), p, atol=1e-300)


def test_axis_out_of_range_is_an_error():
    with pytest.raises(np.exceptions.AxisError):
        ops.sum(dt.tensor(np.ones((2, 3))), axis=2)
