"""Feed-forward layers: output shapes, gradients of inputs and parameters, and mode behaviour."""
import math

import numpy as np
import pytest

import disttrain as dt
from disttrain import nn
from tests.gradcheck import gradcheck
from tests.nn.layer_check import check_layer

rng = np.random.default_rng(0)


def randn(*shape):
    return rng.standard_normal(shape)


# --- Linear, Flatten ------------------------------------------------------------------------


def test_linear_shapes_for_any_leading_axes():
    layer = nn.Linear(4, 3)
    assert layer.weight.shape == (3, 4) and layer.bias.shape == (3,)
    assert layer(dt.randn(5, 4)).shape == (5, 3)
    assert layer(dt.randn(2, 6, 4)).shape == (2, 6, 3)
    x = randn(2, 4).astype(np.float32)
    np.testing.assert_allclose(layer(dt.tensor(x)).data, x @ layer.weight.data.T + layer.bias.data, rtol=1e-6)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_gradients(bias):
    check_layer(nn.Linear(4, 3, bias=bias), randn(2, 5, 4))


def test_linear_rejects_a_wrong_feature_count():
    with pytest.raises(ValueError, match=r"input of shape \(2, 5\) and weight of shape \(3, 4\)"):
        nn.Linear(4, 3)(dt.randn(2, 5))


def test_flatten_merges_the_requested_axes():
    x = dt.randn(2, 3, 4, 5)
    assert nn.Flatten()(x).shape == (2, 60)
    assert nn.Flatten(1, 2)(x).shape == (2, 12, 5)
    assert nn.Flatten(0, -1)(x).shape == (120,)
    gradcheck(nn.Flatten(), randn(2, 3, 2))


# --- convolution and pooling ----------------------------------------------------------------


def test_conv2d_output_shape_with_stride_padding_dilation():
    layer = nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1, dilation=1)
    assert layer.weight.shape == (8, 3, 3, 3)
    assert layer(dt.randn(2, 3, 9, 9)).shape == (2, 8, 5, 5)
    dilated = nn.Conv2d(2, 4, kernel_size=(3, 2), dilation=2, bias=False)
    assert dilated(dt.randn(1, 2, 10, 10)).shape == (1, 4, 6, 8)


def test_conv2d_padding_names():
    assert nn.Conv2d(2, 3, kernel_size=(3, 5), padding="same")(dt.randn(1, 2, 7, 6)).shape == (1, 3, 7, 6)
    assert nn.Conv2d(2, 3, kernel_size=3, padding="same", dilation=2).padding == (2, 2)
    assert nn.Conv2d(2, 3, kernel_size=3, padding="valid")(dt.randn(1, 2, 7, 6)).shape == (1, 3, 5, 4)
    with pytest.raises(ValueError, match="needs uneven padding"):
        nn.Conv2d(2, 3, kernel_size=2, padding="same")
    with pytest.raises(ValueError, match="needs stride 1"):
        nn.Conv2d(2, 3, kernel_size=3, stride=2, padding="same")


@pytest.mark.parametrize("kwargs", [dict(), dict(stride=2, padding=1), dict(groups=2, bias=False)],
                         ids=["plain", "stride-padding", "groups"])
def test_conv2d_gradients(kwargs):
    check_layer(nn.Conv2d(2, 4, kernel_size=3, **kwargs), randn(2, 2, 5, 5))


def test_conv2d_matches_torch():
    torch = pytest.importorskip("torch")
    ours = nn.Conv2d(4, 6, kernel_size=3, stride=2, padding=1, groups=2)
    theirs = torch.nn.Conv2d(4, 6, kernel_size=3, stride=2, padding=1, groups=2)
    ours.load_state_dict({k: v.detach().numpy() for k, v in theirs.state_dict().items()})
    x = randn(2, 4, 7, 7).astype(np.float32)
    np.testing.assert_allclose(ours(dt.tensor(x)).data, theirs(torch.tensor(x)).detach().numpy(),
                               rtol=1e-4, atol=1e-5)


def test_pooling_shapes_and_values():
    x = dt.tensor(np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4))
    np.testing.assert_array_equal(nn.MaxPool2d(2)(x).data, [[[[5, 7], [13, 15]]]])
    np.testing.assert_array_equal(nn.AvgPool2d(2)(x).data, [[[[2.5, 4.5], [10.5, 12.5]]]])
    assert nn.MaxPool2d(3, stride=1, padding=1)(dt.randn(2, 3, 6, 6)).shape == (2, 3, 6, 6)
    assert nn.AvgPool2d(kernel_size=2, stride=1)(dt.randn(2, 3, 6, 5)).shape == (2, 3, 5, 4)


def test_pooling_gradients():
    x = rng.permutation(2 * 2 * 4 * 4).reshape(2, 2, 4, 4) / 7.0  # distinct values: no ties
    gradcheck(nn.MaxPool2d(2), x)
    gradcheck(nn.AvgPool2d(3, stride=1, padding=1), x)


# --- activations ----------------------------------------------------------------------------


ACTIVATIONS = [
    (nn.ReLU(), lambda x: np.maximum(x, 0)),
    (nn.LeakyReLU(0.2), lambda x: np.where(x > 0, x, 0.2 * x)),
    (nn.Sigmoid(), lambda x: 1 / (1 + np.exp(-x))),
    (nn.Tanh(), np.tanh),
    (nn.Softplus(), lambda x: np.log1p(np.exp(x))),
    (nn.GELU(), lambda x: np.array([v * (1 + math.erf(v / math.sqrt(2))) / 2 for v in x.ravel()]).reshape(x.shape)),
    (nn.GELU(approximate="tanh"),
     lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))),
    (nn.Softmax(axis=-1), lambda x: np.exp(x) / np.exp(x).sum(-1, keepdims=True)),
    (nn.LogSoftmax(dim=1), lambda x: x - np.log(np.exp(x).sum(1, keepdims=True))),
]


@pytest.mark.parametrize("module,formula", ACTIVATIONS, ids=lambda a: type(a).__name__ if isinstance(a, nn.Module) else "")
def test_activation_values_and_gradients(module, formula):
    x = randn(3, 5)
    x[np.abs(x) < 1e-3] = 0.5  # keep away from relu's kink
    np.testing.assert_allclose(module(dt.tensor(x)).data, formula(x), rtol=1e-10, atol=1e-12)
    gradcheck(module, x)


def test_gelu_names_its_two_forms_when_given_another():
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh', got 'erf'"):
        nn.GELU(approximate="erf")


# --- dropout --------------------------------------------------------------------------------


def test_dropout_zeroes_a_fraction_p_and_rescales_the_rest_while_training():
    layer = nn.Dropout(0.3)
    out = layer(dt.ones(200, 500)).data
    kept = out != 0
    assert kept.mean() == pytest.approx(0.7, abs=0.01)
    np.testing.assert_allclose(out[kept], 1 / 0.7, rtol=1e-6)


def test_dropout_is_the_identity_in_eval_and_repeatable_under_a_seed():
    layer = nn.Dropout(0.5)
    x = dt.randn(4, 6, rng=np.random.default_rng(1))
    dt.random.manual_seed(3)
    first = layer(x).data
    dt.random.manual_seed(3)
    np.testing.assert_array_equal(layer(x).data, first)
    layer.eval()
    assert layer(x) is x or np.array_equal(layer(x).data, x.data)
    with pytest.raises(ValueError, match="p must be a probability"):
        nn.Dropout(1.5)


def test_dropout_gradient_uses_the_same_mask():
    layer = nn.Dropout(0.5)
    x = dt.tensor(randn(6, 7), requires_grad=True)
    out = layer(x)
    out.sum().backward()
    np.testing.assert_array_equal(x.grad, out.data / x.data)


# --- normalisation --------------------------------------------------------------------------


def test_batchnorm2d_normalises_each_channel_with_batch_statistics():
    layer = nn.BatchNorm2d(3)
    x = randn(4, 3, 5, 5) * 3 + 2
    out = layer(dt.tensor(x.astype(np.float32))).data
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(out.var(axis=(0, 2, 3)), 1, atol=1e-3)


def test_batchnorm_running_statistics_follow_torchs_update():
    layer = nn.BatchNorm1d(3, momentum=0.2)
    batches = [randn(8, 3) * 2 + 1 for _ in range(3)]
    mean, var = np.zeros(3), np.ones(3)
    for batch in batches:
        layer(dt.tensor(batch.astype(np.float32)))
        mean = 0.8 * mean + 0.2 * batch.mean(axis=0)
        var = 0.8 * var + 0.2 * batch.var(axis=0, ddof=1)  # the running variance is unbiased
    np.testing.assert_allclose(layer.running_mean.data, mean, rtol=1e-5)
    np.testing.assert_allclose(layer.running_var.data, var, rtol=1e-5)
    assert int(layer.num_batches_tracked.data) == 3
    layer.eval()
    x = randn(5, 3)
    expected = (x - mean) / np.sqrt(var + layer.eps)
    np.testing.assert_allclose(layer(dt.tensor(x.astype(np.float32))).data, expected, rtol=1e-4, atol=1e-5)


def test_batchnorm_momentum_none_is_a_cumulative_average():
    layer = nn.BatchNorm1d(2, momentum=None)
    batches = [randn(6, 2) + k for k in range(4)]
    for batch in batches:
        layer(dt.tensor(batch.astype(np.float32)))
    np.testing.assert_allclose(layer.running_mean.data, np.mean([b.mean(0) for b in batches], axis=0), rtol=1e-5)


def test_batchnorm_without_running_stats_uses_batch_statistics_in_eval():
    layer = nn.BatchNorm1d(2, track_running_stats=False, affine=False).eval()
    assert list(layer.state_dict()) == []
    out = layer(dt.tensor(randn(10, 2) * 5)).data
    np.testing.assert_allclose(out.mean(axis=0), 0, atol=1e-10)


@pytest.mark.parametrize("layer,shape", [(nn.BatchNorm1d(3), (4, 3)), (nn.BatchNorm1d(2), (3, 2, 4)),
                                         (nn.BatchNorm2d(2), (2, 2, 3, 3))], ids=["1d", "1d-seq", "2d"])
def test_batchnorm_gradients_in_training_and_eval(layer, shape):
    layer.weight.data[...] = rng.uniform(0.5, 1.5, layer.weight.shape)
    layer.bias.data[...] = rng.standard_normal(layer.bias.shape)
    check_layer(layer, randn(*shape))
    layer.running_var.data[...] = rng.uniform(0.5, 2, layer.running_var.shape)
    check_layer(layer.eval(), randn(*shape))


def test_batchnorm_rejects_wrong_rank_and_channels():
    with pytest.raises(ValueError, match="expected a 4-D input"):
        nn.BatchNorm2d(3)(dt.randn(2, 3))
    with pytest.raises(ValueError, match="input has 4 channels"):
        nn.BatchNorm1d(3)(dt.randn(2, 4))


def test_batchnorm_matches_torch_in_train_and_eval():
    torch = pytest.importorskip("torch")
    ours, theirs = nn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    x = (randn(4, 3, 2, 2) * 2 + 1).astype(np.float32)
    for _ in range(2):
        np.testing.assert_allclose(ours(dt.tensor(x)).data, theirs(torch.tensor(x)).detach().numpy(),
                                   rtol=1e-4, atol=1e-5)
    for name, value in theirs.state_dict().items():
        np.testing.assert_allclose(ours.state_dict()[name], value.numpy(), rtol=1e-5, err_msg=name)
    ours.eval(), theirs.eval()
    np.testing.assert_allclose(ours(dt.tensor(x)).data, theirs(torch.tensor(x)).detach().numpy(),
                               rtol=1e-4, atol=1e-5)


def test_layernorm_normalises_trailing_axes_and_has_gradients():
    layer = nn.LayerNorm((3, 4))
    x = (randn(2, 3, 4) * 3 + 1).astype(np.float32)
    out = layer(dt.tensor(x)).data
    np.testing.assert_allclose(out.mean(axis=(1, 2)), 0, atol=1e-6)
    np.testing.assert_allclose(out.var(axis=(1, 2)), 1, atol=1e-4)
    layer.weight.data[...] = rng.uniform(0.5, 1.5, (3, 4))
    layer.bias.data[...] = rng.standard_normal((3, 4))
    check_layer(layer, randn(2, 3, 4))
    check_layer(nn.LayerNorm(5, bias=False), randn(3, 5))


# --- embedding ------------------------------------------------------------------------------


def test_embedding_looks_up_rows_for_any_index_shape():
    layer = nn.Embedding(10, 4)
    ids = np.array([[1, 2, 2], [9, 0, 1]])
    out = layer(ids)
    assert out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out.data, layer.weight.data[ids])


def test_embedding_gradients_dense_and_sparse():
    ids = np.array([[1, 3, 3], [0, 1, 4]])
    check_layer(nn.Embedding(5, 3), ids)
    check_layer(nn.Embedding(5, 3, sparse=True), ids)
    layer = nn.Embedding(6, 2, sparse=True)
    layer(dt.tensor(ids)).sum().backward()
    assert isinstance(layer.weight.grad, dt.RowSparseGrad)
    np.testing.assert_array_equal(layer.weight.grad.indices, [0, 1, 3, 4])
    np.testing.assert_array_equal(layer.weight.grad.values[:, 0], [1, 2, 2, 1])


def test_embedding_padding_row_gets_no_gradient():
    layer = nn.Embedding(5, 2, padding_idx=-1)
    assert layer.padding_idx == 4
    layer(np.array([4, 4, 2])).sum().backward()
    np.testing.assert_array_equal(layer.weight.grad[4], 0)
    np.testing.assert_array_equal(layer.weight.grad[2], 1)
