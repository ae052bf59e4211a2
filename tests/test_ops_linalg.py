"""Gradient checks for matmul in all of numpy's cases: 1-D operands, matrices, batches and
broadcast batches, strided operands."""
import numpy as np
import pytest

import disttrain as dt
from disttrain import ops
from tests.gradcheck import gradcheck

rng = np.random.default_rng(2)

SHAPES = [
    ((3,), (3,)),              # inner product
    ((3,), (3, 4)),            # vector @ matrix
    ((2, 3), (3,)),            # matrix @ vector
    ((2, 3), (3, 4)),
    ((5, 2, 3), (5, 3, 4)),    # batched
    ((5, 2, 3), (3, 4)),       # batch @ shared matrix
    ((2, 3), (5, 3, 4)),       # shared matrix @ batch
    ((2, 1, 2, 3), (5, 3, 4)),  # broadcast batch dimensions
    ((3,), (5, 3, 4)),         # vector @ batch
    ((5, 2, 3), (3,)),         # batch @ vector
]


@pytest.mark.parametrize("a_shape, b_shape", SHAPES)
def test_matmul_gradient(a_shape, b_shape):
    out = gradcheck(ops.matmul, rng.standard_normal(a_shape), rng.standard_normal(b_shape))
    assert out.shape == np.matmul(np.zeros(a_shape), np.zeros(b_shape)).shape


def test_matmul_gradient_on_transposed_and_sliced_operands():
    gradcheck(lambda a, b: a.T @ b[:, ::2], rng.standard_normal((3, 2)), rng.standard_normal((3, 8)))
    gradcheck(lambda a, b: a.transpose(0, 2, 1) @ b.T, rng.standard_normal((4, 3, 2)), rng.standard_normal((5, 3)))


def test_matmul_gradient_when_only_one_side_requires_it():
    w = rng.standard_normal((3, 4))
    gradcheck(lambda x: x @ dt.tensor(w), rng.standard_normal((2, 3)))
    gradcheck(lambda y: dt.tensor(w.T) @ y, rng.standard_normal((3, 2)))


@pytest.mark.parametrize("a_shape, b_shape", [((32, 784), (256, 10)), ((3,), (4,)), ((2, 3, 4), (2, 5, 6))])
def test_matmul_shape_mismatch_names_both_shapes(a_shape, b_shape):
    with pytest.raises(ValueError) as error:
        ops.matmul(dt.tensor(np.ones(a_shape)), dt.tensor(np.ones(b_shape)))
    assert str(a_shape) in str(error.value) and str(b_shape) in str(error.value)


def test_matmul_of_scalars_is_refused():
    with pytest.raises(ValueError, match="scalar"):
        ops.matmul(dt.tensor(np.float64(2.0)), dt.tensor(np.ones(3)))
