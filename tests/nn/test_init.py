"""nn.init: the distributions' statistics, orthogonality, seeding, and every layer's default init."""
import math

import numpy as np
import pytest

import disttrain as dt
from disttrain import nn
from disttrain.nn import init


def blank(*shape):
    return nn.Parameter(np.zeros(shape, np.float32))


@pytest.fixture(autouse=True)
def seeded():
    dt.random.manual_seed(1234)


def test_calculate_gain_matches_the_published_values():
    assert init.calculate_gain("linear") == init.calculate_gain("conv2d") == init.calculate_gain("sigmoid") == 1
    assert init.calculate_gain("tanh") == pytest.approx(5 / 3)
    assert init.calculate_gain("relu") == pytest.approx(math.sqrt(2))
    assert init.calculate_gain("leaky_relu") == pytest.approx(math.sqrt(2 / (1 + 0.01 ** 2)))
    assert init.calculate_gain("leaky_relu", math.sqrt(5)) == pytest.approx(math.sqrt(1 / 3))
    assert init.calculate_gain("selu") == pytest.approx(0.75)
    with pytest.raises(ValueError, match="unsupported nonlinearity 'swish'"):
        init.calculate_gain("swish")


def test_uniform_and_normal_statistics():
    u = init.uniform_(blank(200, 500), -2, 3).data
    assert u.min() >= -2 and u.max() < 3
    assert u.mean() == pytest.approx(0.5, abs=0.02) and u.std() == pytest.approx(5 / math.sqrt(12), rel=0.01)
    n = init.normal_(blank(200, 500), 1.5, 0.5).data
    assert n.mean() == pytest.approx(1.5, abs=0.01) and n.std() == pytest.approx(0.5, rel=0.01)


def test_xavier_uniform_and_normal_use_fan_in_plus_fan_out():
    w = init.xavier_uniform_(blank(300, 100), gain=2.0).data
    bound = 2.0 * math.sqrt(6 / 400)
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound
    assert w.std() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    w = init.xavier_normal_(blank(300, 100)).data
    assert w.std() == pytest.approx(math.sqrt(2 / 400), rel=0.02) and abs(w.mean()) < 0.005


def test_kaiming_uniform_and_normal_follow_gain_over_sqrt_fan():
    w = init.kaiming_uniform_(blank(400, 200), nonlinearity="relu").data
    bound = math.sqrt(2) * math.sqrt(3 / 200)
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound
    w = init.kaiming_normal_(blank(400, 200), mode="fan_out", nonlinearity="relu").data
    assert w.std() == pytest.approx(math.sqrt(2 / 400), rel=0.02)
    conv = init.kaiming_normal_(blank(64, 8, 3, 3), nonlinearity="relu").data  # fan_in = 8 * 9
    assert conv.std() == pytest.approx(math.sqrt(2 / 72), rel=0.03)
    with pytest.raises(ValueError, match="mode 'fan_avg'"):
        init.kaiming_uniform_(blank(2, 2), mode="fan_avg")
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        init.kaiming_uniform_(blank(5))


def test_trunc_normal_stays_in_bounds_with_the_truncated_distributions_moments():
    w = init.trunc_normal_(blank(300, 300), mean=0.0, std=1.0, a=-2.0, b=2.0).data
    assert w.min() >= -2 and w.max() <= 2
    # Standard normal truncated to [-2, 2]: variance 1 - 2 * 2 * phi(2) / (Phi(2) - Phi(-2)).
    phi = math.exp(-2) / math.sqrt(2 * math.pi)
    mass = math.erf(2 / math.sqrt(2))
    assert w.std() == pytest.approx(math.sqrt(1 - 4 * phi / mass), rel=0.01)
    # A narrow window far in the tail goes through the uniform-proposal path.
    tail = init.trunc_normal_(blank(20000), mean=0.0, std=1.0, a=4.0, b=4.5).data
    assert tail.min() >= 4 and tail.max() <= 4.5
    assert tail.mean() < 4.25  # the density falls across the window, so the mass leans left
    with pytest.raises(ValueError, match="need a < b"):
        init.trunc_normal_(blank(3), a=1, b=1)


def test_orthogonal_gives_orthonormal_rows_or_columns():
    tall = init.orthogonal_(blank(50, 20)).data.astype(np.float64)
    np.testing.assert_allclose(tall.T @ tall, np.eye(20), atol=1e-5)
    wide = init.orthogonal_(blank(20, 50), gain=3.0).data.astype(np.float64)
    np.testing.assert_allclose(wide @ wide.T, 9 * np.eye(20), atol=1e-4)
    conv = init.orthogonal_(blank(8, 2, 3, 3)).data.reshape(8, -1).astype(np.float64)
    np.testing.assert_allclose(conv @ conv.T, np.eye(8), atol=1e-5)


def test_constant_zeros_ones_fill_in_place():
    p = blank(3, 2)
    data = p.data
    assert init.constant_(p, 2.5) is p and p.data is data
    np.testing.assert_array_equal(data, 2.5)
    np.testing.assert_array_equal(init.ones_(p).data, 1)
    np.testing.assert_array_equal(init.zeros_(p).data, 0)
    assert p.dtype == np.float32


def test_manual_seed_makes_initialisation_repeatable():
    dt.random.manual_seed(7)
    first = nn.Linear(5, 4).state_dict()
    dt.random.manual_seed(7)
    second = nn.Linear(5, 4).state_dict()
    dt.random.manual_seed(8)
    third = nn.Linear(5, 4).state_dict()
    np.testing.assert_array_equal(first["weight"], second["weight"])
    assert not np.array_equal(first["weight"], third["weight"])


def uniform_bound(values):
    """Check values look U(-b, b) and return b estimated from their standard deviation."""
    return float(values.std()) * math.sqrt(3)


def test_linear_default_init_is_uniform_one_over_sqrt_in_features():
    layer = nn.Linear(400, 300)
    bound = 1 / math.sqrt(400)
    assert np.abs(layer.weight.data).max() <= bound
    assert uniform_bound(layer.weight.data) == pytest.approx(bound, rel=0.02)
    assert np.abs(layer.bias.data).max() <= bound and np.abs(layer.bias.data).max() > 0.9 * bound


def test_conv2d_default_init_uses_fan_in_per_group():
    layer = nn.Conv2d(16, 64, kernel_size=(3, 5), groups=4)
    bound = 1 / math.sqrt(16 // 4 * 3 * 5)
    assert layer.weight.shape == (64, 4, 3, 5)
    assert np.abs(layer.weight.data).max() <= bound
    assert uniform_bound(layer.weight.data) == pytest.approx(bound, rel=0.05)
    assert np.abs(layer.bias.data).max() <= bound


@pytest.mark.parametrize("layer_type", [nn.RNN, nn.LSTM, nn.GRU])
def test_recurrent_default_init_is_uniform_one_over_sqrt_hidden(layer_type):
    layer = layer_type(30, 100, num_layers=2, bidirectional=True)
    bound = 1 / math.sqrt(100)
    values = np.concatenate([p.data.reshape(-1) for p in layer.parameters()])
    assert np.abs(values).max() <= bound
    assert uniform_bound(values) == pytest.approx(bound, rel=0.02)


def test_embedding_default_init_is_standard_normal():
    weight = nn.Embedding(1000, 64).weight.data
    assert weight.std() == pytest.approx(1.0, rel=0.02) and abs(weight.mean()) < 0.02
    padded = nn.Embedding(10, 4, padding_idx=3).weight.data
    np.testing.assert_array_equal(padded[3], 0)


def test_attention_and_norm_default_inits():
    attention = nn.MultiheadAttention(64, 4)
    bound = math.sqrt(6 / (64 + 192))
    assert np.abs(attention.in_proj_weight.data).max() <= bound
    assert uniform_bound(attention.in_proj_weight.data) == pytest.approx(bound, rel=0.05)
    np.testing.assert_array_equal(attention.in_proj_bias.data, 0)
    np.testing.assert_array_equal(attention.out_proj.bias.data, 0)
    assert np.abs(attention.out_proj.weight.data).max() <= 1 / math.sqrt(64)
    for norm in (nn.BatchNorm2d(5), nn.LayerNorm(5)):
        np.testing.assert_array_equal(norm.weight.data, 1)
        np.testing.assert_array_equal(norm.bias.data, 0)


def test_default_bounds_match_torch():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    pairs = [(nn.Linear(50, 20), torch.nn.Linear(50, 20)),
             (nn.Conv2d(6, 8, 3, groups=2), torch.nn.Conv2d(6, 8, 3, groups=2)),
             (nn.LSTM(10, 40), torch.nn.LSTM(10, 40)),
             (nn.MultiheadAttention(16, 2), torch.nn.MultiheadAttention(16, 2))]
    for ours, theirs in pairs:
        theirs_state = theirs.state_dict()
        assert list(ours.state_dict()) == list(theirs_state)
        for name, value in ours.state_dict().items():
            reference = theirs_state[name].numpy()
            assert value.shape == reference.shape, name
            if value.size < 64:  # too few draws for their extremes to pin down the bound
                continue
            # Same distribution family and bound: the extremes agree to within sampling noise.
            assert np.abs(value).max() == pytest.approx(np.abs(reference).max(), rel=0.25, abs=1e-7), name
