"""MultiheadAttention and TransformerEncoderLayer: against a head-by-head numpy reference,
against PyTorch with copied weights, and by float64 gradient checks."""
import functools
import math

import numpy as np
import pytest

import disttrain as dt
from disttrain import nn
from tests.nn.layer_check import check_layer

rng = np.random.default_rng(0)


def randn(*shape):
    return rng.standard_normal(shape)


def reference_attention(module, query, key, value, attn_mask=None, key_padding_mask=None):
    """Batch-major (N, L, E) inputs -> (output, head-averaged weights), one head at a time."""
    params = {name: p.numpy() for name, p in module.named_parameters()}
    w, b = params["in_proj_weight"], params["in_proj_bias"]
    embed, heads = module.embed_dim, module.num_heads
    size = embed // heads
    q = query @ w[:embed].T + b[:embed]
    k = key @ w[embed:2 * embed].T + b[embed:2 * embed]
    v = value @ w[2 * embed:].T + b[2 * embed:]
    batch, target, source = query.shape[0], query.shape[1], key.shape[1]
    heads_out = np.zeros((batch, target, embed))
    averaged = np.zeros((batch, target, source))
    for n in range(batch):
        for h in range(heads):
            cols = slice(h * size, (h + 1) * size)
            scores = q[n][:, cols] @ k[n][:, cols].T / math.sqrt(size)
            if attn_mask is not None:
                mask = attn_mask if attn_mask.ndim == 2 else attn_mask[n * heads + h]
                scores = np.where(mask, -np.inf, scores) if mask.dtype == bool else scores + mask
            if key_padding_mask is not None:
                scores = np.where(key_padding_mask[n][None, :], -np.inf, scores)
            weights = np.exp(scores - scores.max(axis=1, keepdims=True))
            weights /= weights.sum(axis=1, keepdims=True)
            heads_out[n][:, cols] = weights @ v[n][:, cols]
            averaged[n] += weights / heads
    return heads_out @ params["out_proj.weight"].T + params["out_proj.bias"], averaged


def attention(embed=8, heads=2, **kwargs):
    module = nn.MultiheadAttention(embed, heads, **kwargs).double()
    module.in_proj_bias.data[...] = randn(3 * embed) * 0.1  # non-zero, so the biases are tested
    module.out_proj.bias.data[...] = randn(embed) * 0.1
    return module


def causal(length):
    return np.triu(np.ones((length, length), bool), k=1)


MASKS = {
    "none": lambda n, h, l, s: (None, None),
    "causal-bool": lambda n, h, l, s: (causal(l), None),
    "float": lambda n, h, l, s: (randn(l, s), None),
    "per-head-bool": lambda n, h, l, s: (rng.random((n * h, l, s)) < 0.3 * (1 - np.eye(l, s)[None]), None),
    "key-padding": lambda n, h, l, s: (None, np.arange(s)[None, :] >= np.array([[s], [s - 2]])[:n]),
    "causal+padding": lambda n, h, l, s: (causal(l), np.arange(s)[None, :] >= np.array([[s], [s - 1]])[:n]),
}


@pytest.mark.parametrize("mask", MASKS)
def test_self_attention_matches_the_reference(mask):
    module = attention(batch_first=True)
    x = randn(2, 5, 8)
    attn_mask, padding = MASKS[mask](2, 2, 5, 5)
    x_t = dt.tensor(x)
    out, weights = module(x_t, x_t, x_t, attn_mask=attn_mask, key_padding_mask=padding)
    expected_out, expected_weights = reference_attention(module, x, x, x, attn_mask, padding)
    assert out.shape == (2, 5, 8) and weights.shape == (2, 5, 5)
    np.testing.assert_allclose(out.data, expected_out, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(weights.data, expected_weights, rtol=1e-10, atol=1e-12)


def test_cross_attention_with_sequence_first_layout_matches_the_reference():
    module = attention(embed=6, heads=3)
    query, key, value = randn(4, 2, 6), randn(7, 2, 6), randn(7, 2, 6)  # (L, N, E), (S, N, E)
    padding = np.zeros((2, 7), bool)
    padding[1, 5:] = True
    out, weights = module(dt.tensor(query), dt.tensor(key), dt.tensor(value), key_padding_mask=padding)
    to_batch = functools.partial(np.transpose, axes=(1, 0, 2))
    expected_out, expected_weights = reference_attention(module, to_batch(query), to_batch(key),
                                                         to_batch(value), key_padding_mask=padding)
    assert out.shape == (4, 2, 6) and weights.shape == (2, 4, 7)
    np.testing.assert_allclose(out.data, to_batch(expected_out), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(weights.data, expected_weights, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(weights.data[1, :, 5:], 0)  # padded keys get no attention


def test_is_causal_equals_an_explicit_causal_mask_and_weight_options():
    module = attention(batch_first=True)
    x = dt.tensor(randn(2, 4, 8))
    implicit, _ = module(x, x, x, is_causal=True)
    explicit, _ = module(x, x, x, attn_mask=causal(4))
    np.testing.assert_array_equal(implicit.data, explicit.data)
    _, per_head = module(x, x, x, average_attn_weights=False)
    _, averaged = module(x, x, x)
    assert per_head.shape == (2, 2, 4, 4)
    np.testing.assert_allclose(per_head.data.mean(axis=1), averaged.data, rtol=1e-12)
    assert module(x, x, x, need_weights=False)[1] is None


def test_unbatched_input_equals_a_batch_of_one():
    module = attention()
    x = randn(5, 8)
    out, weights = module(dt.tensor(x), dt.tensor(x), dt.tensor(x))
    batched, batched_weights = module(*[dt.tensor(x[:, None])] * 3)
    assert out.shape == (5, 8) and weights.shape == (5, 5)
    np.testing.assert_allclose(out.data, batched.data[:, 0], rtol=1e-12)
    np.testing.assert_allclose(weights.data, batched_weights.data[0], rtol=1e-12)


def test_attention_dropout_drops_weights_in_training_only():
    module = attention(dropout=0.5, batch_first=True)
    x = dt.tensor(randn(1, 6, 8))
    _, weights = module(x, x, x)
    assert np.any(weights.data == 0)
    module.eval()
    _, weights = module(x, x, x)
    np.testing.assert_allclose(weights.data.sum(axis=-1), 1, rtol=1e-12)


def test_attention_errors():
    with pytest.raises(ValueError, match="embed_dim 10 is not divisible by num_heads 3"):
        nn.MultiheadAttention(10, 3)
    with pytest.raises(NotImplementedError, match="kdim/vdim"):
        nn.MultiheadAttention(4, 2, kdim=3)
    module = nn.MultiheadAttention(4, 2)
    x = dt.randn(3, 2, 4)
    with pytest.raises(ValueError, match=r"attn_mask of shape \(2, 2\)"):
        module(x, x, x, attn_mask=np.zeros((2, 2), bool))
    with pytest.raises(ValueError, match=r"key_padding_mask of shape \(3, 2\)"):
        module(x, x, x, key_padding_mask=np.zeros((3, 2), bool))
    with pytest.raises(ValueError, match="embed_dim=4"):
        module(dt.randn(3, 2, 5), x, x)


def test_self_attention_gradients_with_masks():
    module = attention(embed=4, heads=2, batch_first=True)
    padding = np.array([[False, False, True], [False, False, False]])

    mask = np.eye(3, k=2, dtype=bool)  # query 0 may not see key 2
    check_layer(module, randn(2, 3, 4), call=lambda m, x: m(x, x, x, attn_mask=mask, key_padding_mask=padding))


def test_cross_attention_gradients_of_query_key_and_value():
    module = attention(embed=4, heads=2, batch_first=True)
    float_mask = randn(2, 3)
    check_layer(module, randn(1, 2, 4), randn(1, 3, 4), randn(1, 3, 4),
                call=lambda m, q, k, v: m(q, k, v, attn_mask=float_mask))


@pytest.mark.parametrize("batch_first", [False, True])
def test_attention_matches_torch(batch_first):
    torch = pytest.importorskip("torch")
    theirs = torch.nn.MultiheadAttention(8, 4, batch_first=batch_first).double()
    with torch.no_grad():
        theirs.in_proj_bias.normal_()
        theirs.out_proj.bias.normal_()
    ours = nn.MultiheadAttention(8, 4, batch_first=batch_first).double()
    ours.load_state_dict({k: v.detach().numpy() for k, v in theirs.state_dict().items()})
    shape = (2, 5, 8) if batch_first else (5, 2, 8)
    x = randn(*shape)
    padding = np.array([[False] * 5, [False] * 3 + [True] * 2])
    x_t = torch.tensor(x, requires_grad=True)
    out_t, weights_t = theirs(x_t, x_t, x_t, attn_mask=torch.tensor(causal(5)),
                              key_padding_mask=torch.tensor(padding))
    x_d = dt.tensor(x, requires_grad=True)
    out_d, weights_d = ours(x_d, x_d, x_d, attn_mask=causal(5), key_padding_mask=padding)
    np.testing.assert_allclose(out_d.data, out_t.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(weights_d.data, weights_t.detach().numpy(), rtol=1e-10, atol=1e-12)
    loss_weights = randn(*shape)
    (out_t * torch.tensor(loss_weights)).sum().backward()
    (out_d * loss_weights).sum().backward()
    np.testing.assert_allclose(x_d.grad, x_t.grad.numpy(), rtol=1e-9, atol=1e-12)
    for (name, parameter), (_, reference) in zip(ours.named_parameters(), theirs.named_parameters()):
        np.testing.assert_allclose(parameter.grad, reference.grad.numpy(), rtol=1e-9, atol=1e-12, err_msg=name)


# --- TransformerEncoderLayer ----------------------------------------------------------------


def test_encoder_layer_shapes_and_parameter_names():
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16)
    assert layer(dt.randn(5, 3, 8)).shape == (5, 3, 8)
    assert [name for name, _ in layer.named_parameters()] == [
        "self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight",
        "self_attn.out_proj.bias", "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias",
        "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"]
    with pytest.raises(ValueError, match="activation must be 'relu', 'gelu' or a callable"):
        nn.TransformerEncoderLayer(8, 2, activation="swish")


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_layer_matches_torch(norm_first, activation):
    torch = pytest.importorskip("torch")
    theirs = torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=True,
                                              norm_first=norm_first, activation=activation).double()
    ours = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=True,
                                      norm_first=norm_first, activation=activation).double()
    ours.load_state_dict({k: v.detach().numpy() for k, v in theirs.state_dict().items()})
    x = randn(2, 4, 8)
    padding = np.array([[False] * 4, [False, False, False, True]])
    x_t = torch.tensor(x, requires_grad=True)
    out_t = theirs(x_t, src_mask=torch.tensor(causal(4)), src_key_padding_mask=torch.tensor(padding))
    x_d = dt.tensor(x, requires_grad=True)
    out_d = ours(x_d, src_mask=causal(4), src_key_padding_mask=padding)
    np.testing.assert_allclose(out_d.data, out_t.detach().numpy(), rtol=1e-9, atol=1e-11)
    loss_weights = randn(2, 4, 8)
    (out_t * torch.tensor(loss_weights)).sum().backward()
    (out_d * loss_weights).sum().backward()
    np.testing.assert_allclose(x_d.grad, x_t.grad.numpy(), rtol=1e-8, atol=1e-10)
    for (name, parameter), (_, reference) in zip(ours.named_parameters(), theirs.named_parameters()):
        np.testing.assert_allclose(parameter.grad, reference.grad.numpy(), rtol=1e-8, atol=1e-10, err_msg=name)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_encoder_layer_gradients(norm_first):
    layer = nn.TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=0.0, activation="gelu",
                                       norm_first=norm_first)
    check_layer(layer, randn(3, 2, 4), call=lambda m, x: m(x, is_causal=True))


def test_encoder_layer_dropout_is_off_in_eval():
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.5)
    x = dt.randn(3, 2, 8)
    assert not np.allclose(layer(x).data, layer(x).data)
    layer.eval()
    np.testing.assert_array_equal(layer(x).data, layer(x).data)
