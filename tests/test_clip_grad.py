"""clip_grad_norm_: total norm, in-place scaling, sparse rows, torch agreement."""
import math

import numpy as np
import pytest

import disttrain as dt
from disttrain.nn.utils import clip_grad_norm_
from disttrain.tensor import RowSparseGrad


def _with_grad(grad):
    p = dt.tensor(np.zeros_like(grad), requires_grad=True)
    p.grad = grad
    return p


def test_total_norm_is_norm_of_all_grads_joined_and_grads_scale_to_max_norm():
    a, b = _with_grad(np.array([3.0, 0.0])), _with_grad(np.array([[4.0]]))
    array = a.grad
    total = clip_grad_norm_([a, b], max_norm=1.0)
    assert total == pytest.approx(5.0)
    assert a.grad is array  # scaled in place
    np.testing.assert_allclose(a.grad, [3.0 / (5.0 + 1e-6), 0.0])
    np.testing.assert_allclose(b.grad, [[4.0 / (5.0 + 1e-6)]])


def test_grads_below_max_norm_are_unchanged():
    p = _with_grad(np.array([0.3, 0.4], np.float32))
    assert clip_grad_norm_(p, max_norm=1.0) == pytest.approx(0.5)
    np.testing.assert_array_equal(p.grad, np.array([0.3, 0.4], np.float32))


def test_infinity_and_one_norms():
    p = _with_grad(np.array([-3.0, 2.0]))
    assert clip_grad_norm_([p], 10.0, norm_type=math.inf) == 3.0
    assert clip_grad_norm_([p], 10.0, norm_type=1) == pytest.approx(5.0)


def test_row_sparse_grad_norm_uses_its_rows_and_scales_values_in_place():
    sparse = RowSparseGrad(np.array([1, 3], dtype=np.int64), np.array([[3.0], [4.0]], np.float32), (5, 1))
    p = dt.tensor(np.zeros((5, 1), np.float32), requires_grad=True)
    p.grad = sparse
    assert clip_grad_norm_([p], 2.5) == pytest.approx(5.0)
    assert p.grad is sparse and sparse.values.dtype == np.float32
    np.testing.assert_allclose(sparse.to_dense().ravel(), [0, 1.5, 0, 2.0, 0], rtol=1e-5)


def test_parameters_without_grad_are_skipped_and_none_gives_zero():
    assert clip_grad_norm_([dt.tensor(np.ones(2), requires_grad=True)], 1.0) == 0.0


def test_nonfinite_norm_raises_only_when_asked():
    p = _with_grad(np.array([np.inf, 1.0]))
    with pytest.raises(RuntimeError, match="inf"):
        clip_grad_norm_([p], 1.0, error_if_nonfinite=True)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf])
def test_matches_torch_clip_grad_norm(norm_type):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(shape).astype(np.float32) for shape in [(3, 4), (5,), (2, 2, 2)]]
    ours = [_with_grad(g.copy()) for g in grads]
    theirs = [torch.nn.Parameter(torch.zeros(g.shape)) for g in grads]
    for t, g in zip(theirs, grads):
        t.grad = torch.from_numpy(g.copy())
    total = clip_grad_norm_(ours, 0.7, norm_type=norm_type)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 0.7, norm_type=norm_type)
    assert total == pytest.approx(expected.item(), rel=1e-5)
    for p, t in zip(ours, theirs):
        np.testing.assert_allclose(p.grad, t.grad.numpy(), rtol=1e-5, atol=1e-7)
