"""RowSparseGrad.from_rows: repeated rows summed, the result sorted and unique, for every
batch shape an embedding meets (none, one row, every row, rows repeated, nd indices)."""
import numpy as np
import pytest

from disttrain.tensor import RowSparseGrad


def summed_with_add_at(rows, row_grads, shape):
    unique, inverse = np.unique(rows, return_inverse=True)
    values = np.zeros((len(unique),) + shape[1:], row_grads.dtype)
    np.add.at(values, inverse.reshape(-1), row_grads.reshape((-1,) + shape[1:]))
    return unique, values


@pytest.mark.parametrize("rows", [np.zeros(0, np.int64), np.array([7]), np.arange(50)[::-1],
                                  np.array([3, 9, 3, 3, 0, 9]),
                                  np.random.default_rng(0).integers(0, 50, (4, 30))],
                         ids=["none", "one", "every-row", "repeated", "2-d"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_repeated_rows_are_summed_exactly_as_add_at_sums_them(rows, dtype):
    shape = (50, 3, 2)
    row_grads = np.random.default_rng(1).standard_normal(rows.shape + shape[1:]).astype(dtype)
    grad = RowSparseGrad.from_rows(rows, row_grads, shape)
    unique, values = summed_with_add_at(rows, row_grads, shape)
    assert grad.indices.dtype == np.int64 and grad.values.dtype == dtype
    np.testing.assert_array_equal(grad.indices, unique)
    np.testing.assert_array_equal(grad.values, values)   # same order of additions: bit for bit
