"""Dropout, embedding, losses, layer/batch norm and nn.functional.linear: gradient checks,
values from their definitions, running statistics, and (if torch imports) PyTorch."""
import numpy as np
import pytest

import disttrain as dt
import disttrain.nn.functional as F
from disttrain import ops
from tests.gradcheck import gradcheck

rng = np.random.default_rng(5)


def randn(*shape):
    return rng.standard_normal(shape)


# --- dropout --------------------------------------------------------------------------------


def test_dropout_gradient_with_a_fixed_mask():
    # A fresh generator with one seed per call draws the same mask every time.
    gradcheck(lambda x: ops.dropout(x, 0.4, rng=np.random.default_rng(7)), randn(4, 5))
    gradcheck(lambda x: ops.dropout(x.T, 0.4, rng=np.random.default_rng(7)), randn(4, 5))


def test_dropout_zeroes_about_p_and_scales_the_rest():
    x = dt.tensor(np.ones((200, 100), np.float32), requires_grad=True)
    y = ops.dropout(x, 0.3, rng=np.random.default_rng(0))
    zeroed = (y.data == 0).mean()
    assert 0.28 < zeroed < 0.32
    np.testing.assert_allclose(np.unique(y.data), [0, 1 / 0.7], rtol=1e-6)
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, y.data)  # gradient = the same scaled mask
    assert y.dtype == np.float32


def test_dropout_is_identity_in_eval_or_with_p_zero_and_zero_with_p_one():
    x = dt.tensor(randn(3, 3))
    assert ops.dropout(x, 0.5, training=False) is x
    assert ops.dropout(x, 0.0) is x
    np.testing.assert_array_equal(ops.dropout(x, 1.0).data, np.zeros((3, 3)))
    with pytest.raises(ValueError, match="p must be"):
        ops.dropout(x, 1.5)


# --- embedding ------------------------------------------------------------------------------


INDICES = np.array([[1, 4, 1], [0, 4, 4]])


def test_embedding_dense_gradient_with_repeated_indices():
    out = gradcheck(lambda w: ops.embedding(w, INDICES), randn(6, 3))
    assert out.shape == (2, 3, 3)


def test_embedding_sparse_gradient_is_row_sparse_and_matches_dense():
    weight = randn(6, 3)
    g = randn(2, 3, 3)
    sparse, dense = (dt.tensor(weight, requires_grad=True) for _ in range(2))
    (ops.embedding(sparse, INDICES, sparse=True) * g).sum().backward()
    (ops.embedding(dense, INDICES) * g).sum().backward()
    assert isinstance(sparse.grad, dt.RowSparseGrad)
    np.testing.assert_array_equal(sparse.grad.indices, [0, 1, 4])
    assert sparse.grad.values.shape == (3, 3)
    np.testing.assert_allclose(sparse.grad.to_dense(), dense.grad, rtol=1e-12)
    np.testing.assert_allclose(sparse.grad.values[2], g[0, 1] + g[1, 1] + g[1, 2], rtol=1e-12)
    gradcheck(lambda w: ops.embedding(w, INDICES, sparse=True), weight)  # through to_dense()


def test_embedding_padding_idx_gets_no_gradient():
    weight = dt.tensor(randn(6, 3), requires_grad=True)
    ops.embedding(weight, INDICES, padding_idx=4).sum().backward()
    np.testing.assert_array_equal(weight.grad[4], 0)
    np.testing.assert_array_equal(weight.grad[1], [2, 2, 2])


def test_embedding_rejects_out_of_range_and_float_indices():
    weight = dt.tensor(randn(6, 3))
    with pytest.raises(IndexError, match="6 rows"):
        ops.embedding(weight, np.array([0, 6]))
    with pytest.raises(TypeError, match="integers"):
        ops.embedding(weight, np.array([0.0, 1.0]))


# --- cross entropy --------------------------------------------------------------------------


def reference_cross_entropy(logits, labels, ignore_index=-100, label_smoothing=0.0, reduction="mean"):
    """From the definition, on (N, C, ...) logits: -sum(q * log softmax) per position."""
    logits = np.moveaxis(logits, 1, -1).reshape(-1, logits.shape[1])
    flat = labels.reshape(-1)
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    classes = logits.shape[1]
    valid = flat != ignore_index
    q = np.full_like(log_p, label_smoothing / classes)
    q[np.arange(len(flat))[valid], flat[valid]] += 1 - label_smoothing
    losses = -(q * log_p).sum(axis=1) * valid
    if reduction == "none":
        return losses.reshape(labels.shape)
    return losses.sum() if reduction == "sum" else losses.sum() / valid.sum()


CE_CASES = [dict(), dict(reduction="sum"), dict(reduction="none"), dict(label_smoothing=0.2),
            dict(ignore_index=2), dict(ignore_index=2, label_smoothing=0.1, reduction="none")]


@pytest.mark.parametrize("case", CE_CASES, ids=[str(c) for c in CE_CASES])
@pytest.mark.parametrize("shape", [(5, 4), (3, 4, 2, 3)], ids=["NC", "NCHW"])
def test_cross_entropy_gradient_and_value(case, shape):
    logits = randn(*shape) * 2
    labels = rng.integers(0, shape[1], (shape[0],) + shape[2:])
    labels.reshape(-1)[:2] = 2  # make sure ignore_index=2 has something to ignore
    out = gradcheck(lambda z: F.cross_entropy(z, labels, **case), logits)
    np.testing.assert_allclose(out.data, reference_cross_entropy(logits, labels, **case), rtol=1e-12)


def test_cross_entropy_on_strided_logits():
    labels = rng.integers(0, 3, 4)
    gradcheck(lambda z: F.cross_entropy(z.T[:, ::2], labels), randn(6, 4))


def test_cross_entropy_is_stable_for_huge_logits():
    logits = dt.tensor(np.array([[1000.0, -1000.0], [-1000.0, 1000.0]], np.float32), requires_grad=True)
    loss = F.cross_entropy(logits, np.array([0, 0]))
    np.testing.assert_allclose(loss.data, 1000.0)
    loss.backward()
    np.testing.assert_allclose(logits.grad, [[0, 0], [-0.5, 0.5]])
    assert loss.dtype == np.float32 and logits.grad.dtype == np.float32


def test_cross_entropy_mean_over_all_ignored_is_nan_like_torch():
    loss = F.cross_entropy(dt.tensor(randn(2, 3)), np.array([-100, -100]))
    assert np.isnan(loss.data)


def test_cross_entropy_rejects_bad_labels():
    logits = dt.tensor(randn(2, 3))
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3,\)"):
        F.cross_entropy(logits, np.array([0, 1, 2]))
    with pytest.raises(IndexError, match=r"\[0, 3\)"):
        F.cross_entropy(logits, np.array([0, 3]))
    with pytest.raises(TypeError, match="integer"):
        F.cross_entropy(logits, np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="reduction"):
        F.cross_entropy(logits, np.array([0, 1]), reduction="avg")


# --- binary cross entropy and mse -----------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_binary_cross_entropy_with_logits_gradient_for_logits_and_targets(reduction):
    x, y = randn(4, 3) * 3, rng.random((4, 3))
    out = gradcheck(lambda a, b: F.binary_cross_entropy_with_logits(a, b, reduction=reduction), x, y)
    p = 1 / (1 + np.exp(-x))
    losses = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    expected = {"mean": losses.mean(), "sum": losses.sum(), "none": losses}[reduction]
    np.testing.assert_allclose(out.data, expected, rtol=1e-10)


def test_binary_cross_entropy_with_logits_is_stable_for_huge_logits():
    x = dt.tensor(np.array([500.0, -500.0, 500.0]), requires_grad=True)
    loss = F.binary_cross_entropy_with_logits(x, np.array([1.0, 0.0, 0.0]), reduction="none")
    np.testing.assert_allclose(loss.data, [0, 0, 500.0], atol=1e-12)
    loss.sum().backward()
    np.testing.assert_allclose(x.grad, [0, 0, 1], atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_loss_gradient_and_value(reduction):
    a, b = randn(3, 4), randn(3, 4)
    out = gradcheck(lambda p, q: F.mse_loss(p.T, q.T, reduction=reduction), a, b)
    squared = ((a - b) ** 2).T
    np.testing.assert_allclose(out.data, {"mean": squared.mean(), "sum": squared.sum(), "none": squared}[reduction])


def test_losses_reject_shape_mismatch():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        F.mse_loss(dt.tensor(np.ones((2, 3))), dt.tensor(np.ones((3, 2))))
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3,\)"):
        F.binary_cross_entropy_with_logits(dt.tensor(np.ones((2, 3))), dt.tensor(np.ones(3)))


# --- layer norm -----------------------------------------------------------------------------


@pytest.mark.parametrize("normalized_shape", [4, (3, 4)])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_gradient_and_value(normalized_shape, affine):
    x = randn(2, 3, 4) * 2 + 1
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
    params = (randn(*shape), randn(*shape)) if affine else ()
    out = gradcheck(lambda t, *p: F.layer_norm(t, normalized_shape, *p, eps=1e-5), x, *params)
    axes = tuple(range(3 - len(shape), 3))
    expected = (x - x.mean(axis=axes, keepdims=True)) / np.sqrt(x.var(axis=axes, keepdims=True) + 1e-5)
    if affine:
        expected = expected * params[0] + params[1]
    np.testing.assert_allclose(out.data, expected, rtol=1e-10, atol=1e-12)


def test_layer_norm_on_strided_input_and_shape_errors():
    gradcheck(lambda t, w: F.layer_norm(t.T, 3, w), randn(3, 5), randn(3))
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(4,\)"):
        F.layer_norm(dt.tensor(np.ones((2, 3))), 4)
    with pytest.raises(ValueError, match="weight"):
        F.layer_norm(dt.tensor(np.ones((2, 3))), 3, dt.tensor(np.ones(4)))


# --- batch norm -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 2, 5)], ids=["NC", "NCHW"])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_gradient(shape, training):
    running_mean, running_var = randn(3) * 0.1, 1 + rng.random(3)
    out = gradcheck(lambda x, w, b: F.batch_norm(x, running_mean.copy(), running_var.copy(), w, b,
                                                 training=training), randn(*shape) * 2 + 1, randn(3), randn(3))
    assert out.shape == shape


def test_batch_norm_gradient_without_affine_on_strided_input():
    gradcheck(lambda x: F.batch_norm(x.transpose(1, 0, 2, 3), None, None, training=True), randn(3, 4, 2, 2))


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 2, 5)], ids=["NC", "NCHW"])
def test_batch_norm_training_updates_running_stats_and_eval_uses_them(shape):
    x = randn(*shape) * 3 + 2
    axes = (0,) + tuple(range(2, len(shape)))
    running_mean, running_var = np.zeros(3), np.ones(3)
    out = F.batch_norm(dt.tensor(x), running_mean, running_var, training=True, momentum=0.25, eps=1e-5)
    mean, var = x.mean(axis=axes), x.var(axis=axes)
    count = x.size // 3
    np.testing.assert_allclose(running_mean, 0.25 * mean)
    np.testing.assert_allclose(running_var, 0.75 + 0.25 * var * count / (count - 1))  # unbiased
    per_channel = (1, 3) + (1,) * (len(shape) - 2)
    np.testing.assert_allclose(out.data, (x - mean.reshape(per_channel)) / np.sqrt(var.reshape(per_channel) + 1e-5))

    weight, bias = dt.tensor(randn(3)), dt.tensor(randn(3))
    evaluated = F.batch_norm(dt.tensor(x), dt.tensor(running_mean), dt.tensor(running_var), weight, bias)
    expected = ((x - running_mean.reshape(per_channel)) / np.sqrt(running_var.reshape(per_channel) + 1e-5)
                * weight.data.reshape(per_channel) + bias.data.reshape(per_channel))
    np.testing.assert_allclose(evaluated.data, expected)
    np.testing.assert_allclose(running_mean, 0.25 * mean)  # eval leaves them alone


def test_batch_norm_errors():
    with pytest.raises(ValueError, match="more than one value"):
        F.batch_norm(dt.tensor(np.ones((1, 3))), np.zeros(3), np.ones(3), training=True)
    with pytest.raises(ValueError, match="running_mean"):
        F.batch_norm(dt.tensor(np.ones((2, 3))), np.zeros(4), np.ones(3))


# --- linear ---------------------------------------------------------------------------------


@pytest.mark.parametrize("x_shape", [(5, 3), (2, 4, 3), (3,)])
def test_linear_gradient_and_value(x_shape):
    x, weight, bias = randn(*x_shape), randn(4, 3), randn(4)
    out = gradcheck(F.linear, x, weight, bias)
    np.testing.assert_allclose(out.data, x @ weight.T + bias, rtol=1e-12)
    gradcheck(lambda a, w: F.linear(a.T, w), randn(3, 5), weight)


def test_linear_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(5, 3\).*\(4, 2\)"):
        F.linear(dt.tensor(np.ones((5, 3))), dt.tensor(np.ones((4, 2))))


def test_functional_exports_every_name_design_md_lists():
    for name in ["relu", "leaky_relu", "gelu", "sigmoid", "tanh", "softplus", "softmax", "log_softmax",
                 "cross_entropy", "binary_cross_entropy_with_logits", "mse_loss", "conv2d", "max_pool2d",
                 "avg_pool2d", "dropout", "embedding", "layer_norm", "batch_norm", "linear"]:
        assert callable(getattr(F, name)), name


# --- PyTorch cross-checks (only where torch is installed) -----------------------------------


def _torch_compare(ours_fn, torch_fn, arrays, atol=1e-10):
    torch = pytest.importorskip("torch")
    ours = [dt.tensor(a, requires_grad=True) for a in arrays]
    out = ours_fn(*ours)
    g = randn(*out.shape)
    (out * g).sum().backward()
    theirs = [torch.tensor(a, requires_grad=True) for a in arrays]
    expected = torch_fn(*theirs)
    (expected * torch.tensor(g)).sum().backward()
    np.testing.assert_allclose(out.data, expected.detach().numpy(), atol=atol)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a.grad, b.grad.numpy(), atol=atol)


@pytest.mark.parametrize("case", CE_CASES, ids=[str(c) for c in CE_CASES])
def test_cross_entropy_matches_torch(case):
    torch = pytest.importorskip("torch")
    logits, labels = randn(4, 5, 3), rng.integers(0, 5, (4, 3))
    labels[0, 0] = 2
    _torch_compare(lambda z: F.cross_entropy(z, labels, **case),
                   lambda z: torch.nn.functional.cross_entropy(z, torch.tensor(labels), **case), [logits])


def test_layer_norm_matches_torch():
    torch = pytest.importorskip("torch")
    _torch_compare(lambda x, w, b: F.layer_norm(x, (3, 4), w, b),
                   lambda x, w, b: torch.nn.functional.layer_norm(x, (3, 4), w, b),
                   [randn(2, 3, 4), randn(3, 4), randn(3, 4)])


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 2, 5)], ids=["NC", "NCHW"])
def test_batch_norm_matches_torch_including_running_stats(training, shape):
    torch = pytest.importorskip("torch")
    ours_stats = [randn(3) * 0.1, 1 + rng.random(3)]
    theirs_stats = [torch.tensor(s.copy()) for s in ours_stats]
    _torch_compare(lambda x, w, b: F.batch_norm(x, *ours_stats, w, b, training=training, momentum=0.2),
                   lambda x, w, b: torch.nn.functional.batch_norm(x, *theirs_stats, w, b, training=training,
                                                                  momentum=0.2),
                   [randn(*shape), randn(3), randn(3)])
    for a, b in zip(ours_stats, theirs_stats):
        np.testing.assert_allclose(a, b.numpy(), atol=1e-12)


def test_binary_cross_entropy_with_logits_matches_torch():
    torch = pytest.importorskip("torch")
    _torch_compare(F.binary_cross_entropy_with_logits, torch.nn.functional.binary_cross_entropy_with_logits,
                   [randn(3, 4) * 4, rng.random((3, 4))])
